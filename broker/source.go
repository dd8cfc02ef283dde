package broker

import (
	"context"
	"crypto/sha256"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// Source obtains access tokens from one provider's token API.
//
// Token is called by the broker at most once at a time per cache key, but
// concurrently for different keys, so implementations must be safe for
// concurrent use. The context carries the deadline and the trace of the
// fetch; implementations must honour its cancellation. A returned error
// should be an *APIError when the provider answered, so that the broker and
// the HTTP handler can tell a permanent refusal from a transient failure.
// Errors must never contain a credential or a token.
type Source interface {
	// Token obtains a token for req from the provider.
	Token(ctx context.Context, req Request) (Token, error)
}

// PerMerchant is implemented by sources whose tokens belong to one merchant
// even when the request is otherwise the same (a refresh-token source holds
// one refresh token per merchant): the merchant is then part of the cache
// key, so that merchants never share a token.
type PerMerchant interface {
	// PerMerchant reports whether the source's tokens are per merchant.
	PerMerchant() bool
}

// DPoPBound is implemented by sources whose tokens can be bound to a DPoP
// key (RFC 9449): every profile of such a source carries the key
// (Profile.DPoP).
type DPoPBound interface {
	// DPoPKey returns the key the tokens are bound to, nil when they are
	// bearer tokens.
	DPoPKey() *dpop.Key
}

// Revoker is implemented by sources whose provider can revoke a token it
// issued (Nuapay's revoke endpoints, RFC 7009).
type Revoker interface {
	// RevokeToken revokes tok, which was issued for req.
	RevokeToken(ctx context.Context, req Request, tok Token) error
}

// Request describes the token wanted: for which organisation, with which
// scopes and for how long.
type Request struct {
	// Merchant is the merchant the token is for. Used in errors and logs
	// only; the provider sees Organisation.
	Merchant string
	// Organisation is the provider's identifier of the merchant's
	// organisation (Nuapay's encodedOrganisationId). Empty for providers
	// where the credentials alone select the account (OneID).
	Organisation string
	// Scopes are the scopes to ask for, sorted and without duplicates
	// (NewProfile normalises them).
	Scopes []string
	// Audience is the audience or resource the token is for, if the
	// provider needs one.
	Audience string
	// Lifetime is the lifetime to ask for, where the provider lets the
	// client choose (Nuapay's expiresIn). Zero means the source's default.
	Lifetime time.Duration
}

// Profile is what the bindings of one source, scope set, audience and
// lifetime share: every merchant of a provider served with the same scopes
// has the same one (config.Registry keeps one per provider, scope set,
// audience and lifetime), so that a binding holds only what is its own
// (merchant, organisation, cache key). A Profile is immutable once made
// and safe for concurrent use; make it with NewProfile.
type Profile struct {
	// SourceID names the source and the version of its configuration
	// (for example "nuapay-sandbox#3f2a9c01"). Tokens are shared between
	// bindings with the same SourceID, organisation, scopes, audience and
	// lifetime, so a SourceID must change whenever the source's
	// configuration does.
	SourceID string
	// Source is where tokens come from.
	Source Source
	// Scopes are the scopes to ask for, sorted and without duplicates
	// (NewProfile normalises them). Shared: never modify them.
	Scopes []string
	// Audience is the audience or resource the token is for, if the
	// provider needs one.
	Audience string
	// Lifetime is the lifetime to ask for, where the provider lets the
	// client choose. Zero means the source's default.
	Lifetime time.Duration
	// DPoP is the key the source's tokens are bound to (RFC 9449), from
	// the source (DPoPBound); nil for bearer tokens. A request that
	// carries a token of the profile ("DPoP <token>", Entry.Header) must
	// carry a fresh proof signed with it. Its thumbprint is part of the
	// profile's cache keys.
	DPoP *dpop.Key
	// Budget is the provider's token API budget, shared by all its
	// profiles: every call to Source takes a request from it first. Nil:
	// unlimited. Set it right after NewProfile, before the profile is in
	// use; it is not part of the cache key.
	Budget *budget.Budget

	perMerchant bool   // Source implements PerMerchant and says true
	keyTag      string // the cache keys' first keyTagLen bytes (see keyFor)
}

// keyTagLen is the length of a profile's key tag: the first bytes of the
// SHA-256 of its source ID, scopes, audience, lifetime, whether its
// source is PerMerchant and, for a DPoP source, the key's thumbprint, each
// length-prefixed. 128 bits: two profiles of one process never share one
// by chance.
const keyTagLen = 16

// NewProfile returns the profile of a source for a scope set (normalised:
// see NormaliseScopes), audience and lifetime.
func NewProfile(sourceID string, src Source, scopes []string, audience string, lifetime time.Duration) *Profile {
	p := &Profile{SourceID: sourceID, Source: src, Scopes: NormaliseScopes(scopes), Audience: audience, Lifetime: lifetime}
	if pm, ok := src.(PerMerchant); ok && pm.PerMerchant() {
		p.perMerchant = true
	}
	parts := []string{sourceID, strings.Join(p.Scopes, " "), audience, lifetime.String(), strconv.FormatBool(p.perMerchant)}
	if db, ok := src.(DPoPBound); ok {
		if p.DPoP = db.DPoPKey(); p.DPoP != nil {
			parts = append(parts, "dpop", p.DPoP.Thumbprint())
		}
	}
	h := sha256.New()
	for _, part := range parts {
		h.Write(strconv.AppendInt(nil, int64(len(part)), 10))
		h.Write([]byte{':'})
		h.Write([]byte(part))
	}
	p.keyTag = string(h.Sum(nil)[:keyTagLen])
	return p
}

// keyFor returns the cache key of a merchant's binding under p: the
// profile's tag (keyTagLen bytes) then the organisation, or for a
// PerMerchant source the organisation's length, ':', the organisation and
// the merchant: about 25 bytes, whatever the length of the source ID,
// scopes and audience.
func (p *Profile) keyFor(merchant, organisation string) string {
	if p.perMerchant {
		return p.keyTag + strconv.Itoa(len(organisation)) + ":" + organisation + merchant
	}
	return p.keyTag + organisation
}

// Binding ties a merchant's Request to the Source that serves it and to
// the cache key under which its token is kept. Build bindings once, when
// configuration is loaded, and reuse them for every request: the hot path
// then computes nothing. What the bindings of one provider and scope set
// have in common is in their shared Profile (SourceID, Source, Scopes,
// Audience, Lifetime are its fields, promoted).
type Binding struct {
	// Profile is the source, scopes, audience and lifetime, shared with
	// the other bindings made from it. Never nil in a binding in use, and
	// never assigned through a binding (b.Scopes = … would change every
	// binding of the profile, under the same cache keys): make a new
	// Profile (NewProfile) instead.
	*Profile
	current atomic.Pointer[Entry] // the entry this binding was last served
	// Observer, when set, is told about this binding's lookups and fetches
	// (metrics, logs; a Caddy handler sets its own, so that they follow
	// config reloads).
	Observer Observer
	// Merchant is the merchant the token is for. Used in errors and logs
	// only; the provider sees Organisation.
	Merchant string
	// Organisation is the provider's identifier of the merchant's
	// organisation (see Request.Organisation).
	Organisation string

	key string
}

// Request returns what is asked for: the merchant, its organisation and
// the profile's scopes, audience and lifetime. It is built on each call
// (the cold path: a fetch, a revocation, an error).
func (b *Binding) Request() Request {
	return Request{Merchant: b.Merchant, Organisation: b.Organisation, Scopes: b.Scopes, Audience: b.Audience, Lifetime: b.Lifetime}
}

// NewBindingFor returns the binding of a merchant under a shared profile,
// its cache key computed.
func NewBindingFor(p *Profile, merchant, organisation string) *Binding {
	b := new(Binding)
	b.InitFor(p, merchant, organisation)
	return b
}

// InitFor fills b, a zero Binding, as NewBindingFor would: for a Binding
// embedded by value in a larger struct. b must not be in use yet.
func (b *Binding) InitFor(p *Profile, merchant, organisation string) {
	b.Profile, b.Merchant, b.Organisation, b.key = p, merchant, organisation, p.keyFor(merchant, organisation)
}

// Key is the cache key of the binding, an opaque binary string: equal for
// two bindings exactly when they have the same source ID, organisation,
// sorted scopes, audience and requested lifetime, and for a PerMerchant
// source the same merchant (see keyFor). Not printable: never log it.
func (b *Binding) Key() string { return b.key }

// NormaliseScopes returns the scopes sorted, trimmed and without duplicates
// or empty strings. The input is not modified; when it is already
// normalised it is returned itself (not a copy), so that bindings built
// from one scope list share it: callers must not modify the result.
func NormaliseScopes(scopes []string) []string {
	if normalised(scopes) {
		return scopes
	}
	out := make([]string, 0, len(scopes))
	for _, s := range scopes {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// normalised reports whether scopes are sorted, trimmed and without
// duplicates or empty strings.
func normalised(scopes []string) bool {
	for i, s := range scopes {
		if s == "" || strings.TrimSpace(s) != s || (i > 0 && scopes[i-1] >= s) {
			return false
		}
	}
	return true
}
