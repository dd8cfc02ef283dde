package httpclient

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
)

// TestObserveTokenAnswers: a client given to ObserveTokenAnswers has its
// transport observed once, sends the requests marked by TokenRequest
// through the observer and the others past it, and HasClientCert still
// knows whether it presents a certificate.
func TestObserveTokenAnswers(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
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
		{"zero client (http.DefaultTransport)", &http.Client{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			observed := 0
			var seen atomic.Int32
			ObserveTokenAnswers(tc.client, func(rt http.RoundTripper) http.RoundTripper {
				observed++
				return roundTripFunc(func(r *http.Request) (*http.Response, error) {
					seen.Add(1)
					return rt.RoundTrip(r)
				})
			})
			if has, known := HasClientCert(tc.client); observed != 1 || has || !known {
				t.Errorf("observed %d times; HasClientCert = %v, %v: want once, false, true", observed, has, known)
			}
			for _, ctx := range []context.Context{context.Background(), TokenRequest(context.Background())} {
				req, err := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
				if err != nil {
					t.Fatal(err)
				}
				resp, err := tc.client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
			}
			if n := seen.Load(); n != 1 {
				t.Errorf("the observer saw %d of a plain and a token request, want 1 (the token request)", n)
			}
		})
	}
}

// roundTripFunc is a RoundTripper made of a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
