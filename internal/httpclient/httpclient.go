// Package httpclient holds the wire helpers of the token sources that are
// not API: the provider HTTP client (TLS options, tracing, no redirects),
// the cap on response bodies, the one validator of endpoint URLs, the
// building of query strings, the redaction of URLs from transport errors,
// and the marking of token requests whose answers a provider's budget
// observes (TokenRequest, ObserveTokenAnswers).
package httpclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

// MaxResponseBytes caps how much of a token API's response body is read.
const MaxResponseBytes = 1 << 20

// TLSOptions configure the TLS client side of a provider connection: a client
// certificate for mutual TLS (Nuapay Technical Service Provider mode with an
// eIDAS QWAC, RFC 8705 tls_client_auth and certificate-bound tokens) and the
// CAs to trust.
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
		pool, err := CertPool(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("CA bundle: %w", err)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// CertPool reads a PEM file of CA certificates into a pool. It fails when
// the file cannot be read or contains no PEM certificate.
func CertPool(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate in it", file)
	}
	return pool, nil
}

// New returns a client for a token API: its own connection pool, the given
// overall timeout per call, and the TLS options. Redirects are not followed:
// a token API that redirects is misconfigured, and following it would send
// the credentials elsewhere. HasClientCert tells whether it presents a
// client certificate.
func New(timeout time.Duration, tlsOpts TLSOptions) (*http.Client, error) {
	tlsCfg, err := tlsOpts.Config()
	if err != nil {
		return nil, err
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsCfg
	tr.MaxIdleConnsPerHost = 16
	return &http.Client{
		Timeout:   timeout,
		Transport: &transport{RoundTripper: traced(tr), cert: hasCert(tr)},
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}, nil
}

// transport is the outer transport of a client from New: it remembers
// whether the TLS configuration under the tracing presents a client
// certificate.
type transport struct {
	http.RoundTripper
	cert bool
}

func hasCert(tr *http.Transport) bool {
	c := tr.TLSClientConfig
	return c != nil && (len(c.Certificates) > 0 || c.GetClientCertificate != nil)
}

// HasClientCert reports whether c presents a TLS client certificate, and
// whether that is known: for a client from New, or one with a plain
// *http.Transport, it is; for any other transport (a test double, a
// wrapper) known is false.
func HasClientCert(c *http.Client) (has, known bool) {
	if c == nil {
		return false, true
	}
	switch tr := c.Transport.(type) {
	case *transport:
		return tr.cert, true
	case *http.Transport:
		return hasCert(tr), true
	case nil:
		return false, true
	}
	return false, false
}

// ReadBody reads at most MaxResponseBytes of a response body; tooLarge
// reports a larger one (whose body is then not returned), also through a
// client of LimitBody, whose read of a larger body fails with a
// *TooLargeError.
func ReadBody(r io.Reader) (body []byte, tooLarge bool, err error) {
	body, err = io.ReadAll(io.LimitReader(r, MaxResponseBytes+1))
	if tl := (*TooLargeError)(nil); errors.As(err, &tl) {
		return nil, true, nil
	}
	if err != nil {
		return nil, false, err
	}
	if len(body) > MaxResponseBytes {
		return nil, true, nil
	}
	return body, false, nil
}

// TooLargeError is an answer whose body is over MaxResponseBytes (a
// provider's, or a caller issuer's key set): what was read of it is not
// used.
type TooLargeError struct {
	// Host is the host that answered.
	Host string
	// Status is the answer's HTTP status, 0 when the error that holds this
	// one reports it (a *broker.APIError).
	Status int
}

// Error says which host answered too much (with which status, when
// Status is set), the limit, and what to check.
func (e *TooLargeError) Error() string {
	status := ""
	if e.Status != 0 {
		status = fmt.Sprintf(" (status %d)", e.Status)
	}
	return fmt.Sprintf("the answer of %s%s has a body over %d bytes, the limit of an answer the token broker reads: "+
		"check that the configured URL is the server's endpoint (not a page or a file), or ask the server's operator why it answers so much", e.Host, status, MaxResponseBytes)
}

// LimitBody wraps rt (nil: http.DefaultTransport) so that no response body
// yields more than MaxResponseBytes, for libraries that read bodies whole
// (go-oidc's discovery and key set): reading past the limit fails with a
// *TooLargeError, so that the library reports a body too large, not a
// document cut short.
func LimitBody(rt http.RoundTripper) http.RoundTripper { return limitBody{rt} }

type limitBody struct{ rt http.RoundTripper }

func (l limitBody) RoundTrip(r *http.Request) (*http.Response, error) {
	rt := l.rt
	if rt == nil {
		rt = http.DefaultTransport
	}
	resp, err := rt.RoundTrip(r)
	if err == nil {
		resp.Body = &limitedBody{r: io.LimitReader(resp.Body, MaxResponseBytes+1), host: r.URL.Host, status: resp.StatusCode, Closer: resp.Body}
	}
	return resp, err
}

// limitedBody is a response body of LimitBody: r reads one byte more than
// the limit, to tell a body of exactly MaxResponseBytes from a larger one.
// Its *TooLargeError carries the answer's status, which a library that
// fails on the read does not report.
type limitedBody struct {
	r      io.Reader
	n      int64 // bytes read so far
	host   string
	status int
	io.Closer
}

// Read reads from the body and fails with a *TooLargeError once more
// than MaxResponseBytes were read.
func (b *limitedBody) Read(p []byte) (int, error) {
	if b.n > MaxResponseBytes {
		return 0, &TooLargeError{Host: b.host, Status: b.status}
	}
	n, err := b.r.Read(p)
	b.n += int64(n)
	if over := b.n - MaxResponseBytes; over > 0 {
		return n - int(over), &TooLargeError{Host: b.host, Status: b.status}
	}
	return n, err
}

// CheckURL is the one validator of a provider endpoint URL: absolute
// http(s) with a host, without credentials or fragment, and without query
// unless query is true. The message never quotes a URL that holds
// credentials; callers prefix the field.
func CheckURL(s string, query bool) error {
	u, err := url.Parse(s)
	switch {
	case s == "":
		return errors.New("missing")
	case err != nil:
		return errors.New("not a valid URL") // the parse error would repeat the value, which may hold credentials
	case u.User != nil:
		return errors.New("must not hold credentials (user:password@): use the provider's secret keys")
	case u.Fragment != "" || strings.HasSuffix(s, "#"):
		return errors.New("must not carry a fragment")
	case !query && (u.RawQuery != "" || strings.HasSuffix(s, "?")):
		return errors.New("must not carry a query")
	case u.Scheme != "https" && u.Scheme != "http" || u.Host == "":
		return fmt.Errorf("%q is not an http(s) URL with a host", s)
	}
	return nil
}

// WithQuery returns u with params appended to its query.
func WithQuery(u string, params url.Values) string {
	sep := "?"
	if strings.Contains(u, "?") {
		sep = "&"
	}
	return u + sep + params.Encode()
}

// Host returns the host of a URL, for messages (s itself when it has none).
func Host(s string) string {
	if u, err := url.Parse(s); err == nil && u.Host != "" {
		return u.Host
	}
	return s
}

// Endpoint returns scheme://host/path of a URL, for messages: without
// user info, query or fragment, which may carry credentials or tenant
// ids; "" when s is not a URL with a host.
func Endpoint(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" {
		return ""
	}
	return (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path, RawPath: u.RawPath}).String()
}

// RedactURLError drops the URL (and so any query) from a *url.Error: a
// token API's URL can carry an organisation id or a query that has no
// place in a log line that already names the merchant and the host.
func RedactURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// IsBearer reports whether a token type names a bearer token, ignoring
// case ("Bearer", "BEARER", "bearer"). An empty type is not bearer: the
// callers decide what its absence means.
func IsBearer(tokenType string) bool { return strings.EqualFold(tokenType, "bearer") }

// tokenRequestKey marks the context of a request to a token endpoint.
type tokenRequestKey struct{}

// TokenRequest returns ctx marked as a token request's (a mint, a refresh,
// a grant), whose answers a client of ObserveTokenAnswers observes.
func TokenRequest(ctx context.Context) context.Context {
	return context.WithValue(ctx, tokenRequestKey{}, true)
}

// ObserveTokenAnswers replaces c's transport base so that the requests
// marked by TokenRequest go through observe(base) and the others straight
// to base: a provider's token budget observes its token endpoint only.
// What HasClientCert knows of c is kept. Call it before c is in use.
func ObserveTokenAnswers(c *http.Client, observe func(http.RoundTripper) http.RoundTripper) {
	wrap := func(base http.RoundTripper) http.RoundTripper {
		return tokenAnswers{base: base, observed: observe(base)}
	}
	switch tr := c.Transport.(type) {
	case *transport:
		c.Transport = &transport{RoundTripper: wrap(tr.RoundTripper), cert: tr.cert}
	case *http.Transport:
		c.Transport = &transport{RoundTripper: wrap(tr), cert: hasCert(tr)}
	case nil: // the client sends through http.DefaultTransport
		c.Transport = &transport{RoundTripper: wrap(http.DefaultTransport)}
	default:
		c.Transport = wrap(c.Transport)
	}
}

// tokenAnswers is the RoundTripper of ObserveTokenAnswers.
type tokenAnswers struct {
	base, observed http.RoundTripper
}

// RoundTrip implements http.RoundTripper.
func (t tokenAnswers) RoundTrip(r *http.Request) (*http.Response, error) {
	if marked, _ := r.Context().Value(tokenRequestKey{}).(bool); marked {
		return t.observed.RoundTrip(r)
	}
	return t.base.RoundTrip(r)
}
