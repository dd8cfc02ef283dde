package telemetry

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
)

// tracerName is the instrumentation scope of the broker's spans.
const tracerName = "github.com/tokenbroker/caddy-token-broker"

// Span and attribute names. The token itself is never an attribute; its
// fingerprint is.
const (
	tokenSpanName    = "token_broker.token"
	attrMerchant     = attribute.Key("token_broker.merchant")
	attrProvider     = attribute.Key("token_broker.provider")
	attrScopesCount  = attribute.Key("token_broker.scopes.count")
	attrCache        = attribute.Key("token_broker.cache")
	attrOutcome      = attribute.Key("token_broker.outcome")
	attrFingerprint  = attribute.Key("token_broker.fingerprint")
	attrOrganisation = attribute.Key("token_broker.organisation")
)

// Token gets the binding's token from br. When the request is traced (a
// recording span in ctx), the lookup gets a span "token_broker.token"
// under the request's span, from the request span's tracer provider (no
// global one is assumed); token API calls made for it are its children.
// An untraced request costs nothing more than the lookup.
func Token(ctx context.Context, br *broker.Broker, b *bindings.Binding) (*broker.Entry, broker.Result, error) {
	parent := trace.SpanFromContext(ctx)
	if !parent.IsRecording() {
		return br.Get(ctx, &b.Binding)
	}
	ctx, span := parent.TracerProvider().Tracer(tracerName).Start(ctx, tokenSpanName,
		trace.WithSpanKind(trace.SpanKindInternal),
		trace.WithAttributes(
			attrMerchant.String(b.Merchant),
			attrProvider.String(b.Provider.Name),
			attrOrganisation.String(b.Organisation),
			attrScopesCount.Int(len(b.Scopes)),
		))
	defer span.End()
	e, res, err := br.Get(ctx, &b.Binding)
	if err != nil {
		code := errcode.Classify(err).String()
		span.SetAttributes(attrCache.String(res.String()), attrOutcome.String(code))
		// Errors never carry a credential or a token (broker.Source's contract).
		span.SetStatus(codes.Error, code)
		span.RecordError(err)
		return e, res, err
	}
	span.SetAttributes(attrCache.String(res.String()), attrOutcome.String(OutcomeOK),
		attrFingerprint.String(e.Fingerprint()))
	return e, res, nil
}
