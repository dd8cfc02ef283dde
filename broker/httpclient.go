package broker

import (
	"net/http"
	"time"

	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// MaxResponseBytes caps how much of a token API's response body is read.
const MaxResponseBytes = httpclient.MaxResponseBytes

// TLSOptions configure the TLS client side of a provider connection: a
// client certificate for mutual TLS and the CAs to trust.
type TLSOptions = httpclient.TLSOptions

// NewHTTPClient returns a client for a token API: its own connection pool,
// the given overall timeout per call, the TLS options, a client span per
// call, and no redirects followed (they would send the credentials
// elsewhere).
func NewHTTPClient(timeout time.Duration, tlsOpts TLSOptions) (*http.Client, error) {
	return httpclient.New(timeout, tlsOpts)
}
