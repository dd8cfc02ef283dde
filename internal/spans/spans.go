// Package spans names what the broker's OpenTelemetry spans carry: the
// instrumentation scope and the attribute keys, shared by every package
// that starts a span. A token is never an attribute; its fingerprint is.
package spans

import "go.opentelemetry.io/otel/attribute"

// TracerName is the instrumentation scope of the broker's spans.
const TracerName = "github.com/tokenbroker/caddy-token-broker"

// Attribute keys.
const (
	// Merchant is the merchant id.
	Merchant = attribute.Key("token_broker.merchant")
	// Provider is the provider's name in the registry.
	Provider = attribute.Key("token_broker.provider")
	// Organisation is the merchant's organisation at the provider.
	Organisation = attribute.Key("token_broker.organisation")
	// ScopesCount is how many scopes the token is asked for.
	ScopesCount = attribute.Key("token_broker.scopes.count")
	// Cache says how the token was served (broker.Result).
	Cache = attribute.Key("token_broker.cache")
	// Outcome is the step's outcome ("ok" or an error code).
	Outcome = attribute.Key("token_broker.outcome")
	// Fingerprint is the token's fingerprint (broker.Token.Fingerprint).
	Fingerprint = attribute.Key("token_broker.fingerprint")
)
