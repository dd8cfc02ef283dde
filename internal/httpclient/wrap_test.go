package httpclient

import (
	"net/http"
	"testing"
)

// TestWrapTransport: a wrapped client's transport goes through the
// wrapper, and HasClientCert still knows whether it presents a
// certificate.
func TestWrapTransport(t *testing.T) {
	plain, err := New(0, TLSOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		client *http.Client
	}{
		{"client from New", plain},
		{"plain transport", &http.Client{Transport: &http.Transport{}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wrapped := 0
			WrapTransport(tc.client, func(rt http.RoundTripper) http.RoundTripper {
				wrapped++
				return rt
			})
			if has, known := HasClientCert(tc.client); wrapped != 1 || has || !known {
				t.Errorf("wrapped %d times; HasClientCert = %v, %v: want once, false, true", wrapped, has, known)
			}
		})
	}
}
