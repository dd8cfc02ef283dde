package httpclient

import (
	"net/http"
	"testing"
)

// TestObserveTokenAnswers: a client given to ObserveTokenAnswers has its
// transport observed once, and HasClientCert still knows whether it
// presents a certificate.
func TestObserveTokenAnswers(t *testing.T) {
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
			observed := 0
			ObserveTokenAnswers(tc.client, func(rt http.RoundTripper) http.RoundTripper {
				observed++
				return rt
			})
			if has, known := HasClientCert(tc.client); observed != 1 || has || !known {
				t.Errorf("observed %d times; HasClientCert = %v, %v: want once, false, true", observed, has, known)
			}
		})
	}
}
