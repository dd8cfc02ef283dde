package httpclient

import (
	"net/http"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/propagation"
)

// traced wraps rt so that every token API call gets an OpenTelemetry
// client span, from the tracer provider of the span in the request's
// context, and carries the trace context in a W3C traceparent header
// (without a span there: the global provider, and no header). The span records the method, URL, status and
// errors, never headers or bodies: no credential or token reaches it.
func traced(rt http.RoundTripper) http.RoundTripper {
	return otelhttp.NewTransport(rt,
		otelhttp.WithPropagators(propagation.TraceContext{}),
		otelhttp.WithSpanNameFormatter(func(_ string, r *http.Request) string {
			return "token_api " + r.Method
		}),
	)
}
