package httpclient

import (
	"net/http"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/propagation"
)

// traced wraps rt so that every token API call gets an
// OpenTelemetry client span and carries the trace context to the provider
// in a W3C traceparent header.
//
// The span comes from the tracer provider of the span in the request's
// context (the broker's fetch context keeps the values of the HTTP request
// that started it, so with Caddy's tracing directive on, the client span is
// a child of the token_broker.token span). Without a span in the context the
// global provider is used, a no-op unless the program sets one, and no
// header is added. The span records the method, URL, status and errors of
// the call, never its headers or bodies: neither the credentials nor the
// token reach it.
func traced(rt http.RoundTripper) http.RoundTripper {
	return otelhttp.NewTransport(rt,
		otelhttp.WithPropagators(propagation.TraceContext{}),
		otelhttp.WithSpanNameFormatter(func(_ string, r *http.Request) string {
			return "token_api " + r.Method
		}),
	)
}
