package telemetry

import (
	"context"

	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/internal/spans"
)

// tokenSpanName is the span of a token lookup. The token itself is never
// an attribute; its fingerprint is.
const tokenSpanName = "token_broker.token"

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
	ctx, span := parent.TracerProvider().Tracer(spans.TracerName).Start(ctx, tokenSpanName,
		trace.WithSpanKind(trace.SpanKindInternal),
		trace.WithAttributes(
			spans.Merchant.String(b.Merchant),
			spans.Provider.String(b.Provider.Name),
			spans.Organisation.String(b.Organisation),
			spans.ScopesCount.Int(len(b.Scopes)),
		))
	defer span.End()
	e, res, err := br.Get(ctx, &b.Binding)
	if err != nil {
		code := errcode.Classify(err).String()
		span.SetAttributes(spans.Cache.String(res.String()), spans.Outcome.String(code))
		// Errors never carry a credential or a token (broker.Source's contract).
		span.SetStatus(codes.Error, code)
		span.RecordError(err)
		return e, res, err
	}
	span.SetAttributes(spans.Cache.String(res.String()), spans.Outcome.String(OutcomeOK),
		spans.Fingerprint.String(e.Fingerprint()))
	return e, res, nil
}
