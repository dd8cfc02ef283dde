package broker

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

// MaxResponseBytes caps how much of a token API's response body is read.
const MaxResponseBytes = 1 << 20

// TLSOptions configure the TLS client side of a provider connection: a client
// certificate for mutual TLS (Nuapay Technical Service Provider mode with an
// eIDAS QWAC, RFC 8705 tls_client_auth) and the CAs to trust.
type TLSOptions struct {
	// CertFile is a PEM client certificate chain; KeyFile its PEM key.
	// Both or neither.
	CertFile string
	// KeyFile is the PEM private key of CertFile.
	KeyFile string
	// CAFile is a PEM bundle of CAs trusted for the provider's server
	// certificate, instead of the system roots.
	CAFile string
	// ServerName overrides the name checked in the server certificate.
	ServerName string
}

// Config returns the tls.Config these options describe, or nil when they are
// all empty.
func (o TLSOptions) Config() (*tls.Config, error) {
	if o == (TLSOptions{}) {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: o.ServerName}
	if (o.CertFile == "") != (o.KeyFile == "") {
		return nil, errors.New("client_cert and client_key must be given together")
	}
	if o.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(o.CertFile, o.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("loading client certificate %s: %w", o.CertFile, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if o.CAFile != "" {
		pem, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("reading CA bundle: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("CA bundle %s holds no PEM certificate", o.CAFile)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// NewHTTPClient returns a client for a token API: its own connection pool,
// the given overall timeout per call, and the TLS options. Redirects are not
// followed: a token API that redirects is misconfigured, and following it
// would send the credentials elsewhere.
func NewHTTPClient(timeout time.Duration, tlsOpts TLSOptions) (*http.Client, error) {
	tlsCfg, err := tlsOpts.Config()
	if err != nil {
		return nil, err
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsCfg
	tr.MaxIdleConnsPerHost = 16
	return &http.Client{
		Timeout:   timeout,
		Transport: TracedTransport(tr),
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}, nil
}

// readBody reads at most MaxResponseBytes of a response body and reports a
// larger one as an error.
func readBody(provider string, resp *http.Response) ([]byte, error) {
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxResponseBytes+1))
	if err != nil {
		return nil, fmt.Errorf("%s token API: reading response: %w", provider, err)
	}
	if len(body) > MaxResponseBytes {
		return nil, &APIError{Provider: provider, StatusCode: resp.StatusCode, Code: "response_too_large",
			Description: fmt.Sprintf("response body is over %d bytes", MaxResponseBytes)}
	}
	return body, nil
}
