package module

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/outbound"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// dpopSource is a source whose tokens are bound to key (type DPoP).
type dpopSource struct{ key *dpop.Key }

func (s dpopSource) Token(context.Context, broker.Request) (broker.Token, error) {
	return broker.Token{Value: broker.Secret("dpop." + strings.Repeat("x", 580)), Type: broker.DPoPType, Expiry: time.Now().Add(time.Hour)}, nil
}

func (s dpopSource) DPoPKey() *dpop.Key { return s.key }

// dpopHandler returns a handler for merchant "acme" whose provider's
// tokens are DPoP-bound (bound) or bearer tokens, with the token cached.
func dpopHandler(t *testing.T, bound bool) *Handler {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := dpop.NewKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	var src broker.Source = dpopSource{key: k}
	if !bound {
		src = sourceFunc(func(context.Context, broker.Request) (broker.Token, error) {
			return broker.Token{Value: broker.Secret("bearer." + strings.Repeat("x", 580)), Expiry: time.Now().Add(time.Hour)}, nil
		})
	}
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(),
		merchantHeader: "X-Merchant-Id", header: "Authorization"}
	h.broker = broker.New(broker.Options{})
	t.Cleanup(h.broker.Close)
	b := broker.NewBinding("bank#test", src, broker.Request{Merchant: "acme", Organisation: "org-acme", Scopes: []string{"accounts"}})
	h.bindings = handTable("bank", "oauth2", b)
	if _, _, err := h.broker.Get(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	h.instrument(nil)
	return h
}

// caddyRequest is req with the per-request state Caddy's server gives it:
// a replacer and the variables map with the client's address.
func caddyRequest(req *http.Request) *http.Request {
	ctx := context.WithValue(req.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer())
	ctx = context.WithValue(ctx, caddyhttp.VarsCtxKey, map[string]any{caddyhttp.TrustedProxyVarKey: false, caddyhttp.ClientIPVarKey: "127.0.0.1"})
	return req.WithContext(ctx)
}

// signing is reverse_proxy with the DPoP transport, upstream left out:
// it signs the request as DPoPTransport.RoundTrip does, keeps the header
// it would send in *sent, and answers 200.
func signing(sent *http.Header) caddyhttp.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		if d := dpopOf(r.Context()); d != nil {
			out, _, err := signedCopy(r, d, time.Now())
			if err != nil {
				return err
			}
			*sent = out.Header
		}
		w.WriteHeader(http.StatusOK)
		return nil
	}
}

// TestDPoPHandler: a DPoP-bound token goes as "Authorization: DPoP" with
// the request's binding to the key for the transport, which signs it; a
// route whose next does not sign gets 502 dpop_transport_missing, the
// upstream's answer dropped, and its later DPoP requests are not
// forwarded at all.
func TestDPoPHandler(t *testing.T) {
	h := dpopHandler(t, true)
	h.dpopUnsigned = new(atomic.Bool)
	req := httptest.NewRequest("GET", "/accounts", nil)
	req.Header.Set("X-Merchant-Id", "acme")
	req.Header.Set("DPoP", "caller-proof")

	var sent http.Header
	rec := httptest.NewRecorder()
	if err := h.ServeHTTP(rec, caddyRequest(req.Clone(context.Background())), signing(&sent)); err != nil || rec.Code != http.StatusOK {
		t.Fatalf("signed route: %d %v", rec.Code, err)
	}
	if a := sent.Values("Authorization"); len(a) != 1 || !strings.HasPrefix(a[0], "DPoP dpop.") {
		t.Errorf("Authorization sent: %d values, want one DPoP token", len(a))
	}
	if p := sent.Values("DPoP"); len(p) != 1 || p[0] == "caller-proof" {
		t.Errorf("DPoP sent: %q, want one proof of the transport", p)
	}

	calls := 0
	unsigned := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		calls++
		w.Header().Set("X-Upstream", "1")
		w.WriteHeader(http.StatusUnauthorized)
		_, err := w.Write([]byte(`{"upstream":"body"}`))
		return err
	})
	for i := range 2 {
		rec := httptest.NewRecorder()
		if err := h.ServeHTTP(rec, caddyRequest(req.Clone(context.Background())), unsigned); err != nil {
			t.Fatal(err)
		}
		if rec.Code != http.StatusBadGateway || !strings.Contains(rec.Body.String(), "dpop_transport_missing") ||
			strings.Contains(rec.Body.String(), "upstream") || rec.Header().Get("X-Upstream") != "" {
			t.Errorf("request %d without the transport: %d %v %s", i, rec.Code, rec.Header(), rec.Body)
		}
	}
	if calls != 1 {
		t.Errorf("next called %d times, want once: a route found without the transport forwards no DPoP token", calls)
	}
}

// TestDPoPHandlerAllocations: the handler's part of a DPoP request
// allocates nothing more than a bearer request's; the difference is the
// transport's signing (signedCopy: the proof, its htu and ath, and the
// copy of the request that carries it).
func TestDPoPHandlerAllocations(t *testing.T) {
	req := httptest.NewRequest("GET", "/accounts", nil)
	req.Header.Set("X-Merchant-Id", "acme")
	measure := func(h *Handler) float64 {
		rec := httptest.NewRecorder()
		var sent http.Header
		next := signing(&sent)
		return testing.AllocsPerRun(200, func() {
			r := caddyRequest(req)
			r.Header = http.Header{"X-Merchant-Id": {"acme"}}
			if err := h.ServeHTTP(rec, r, next); err != nil {
				t.Fatal(err)
			}
		})
	}
	bearer, bound := measure(dpopHandler(t, false)), measure(dpopHandler(t, true))

	h := dpopHandler(t, true)
	signReq := httptest.NewRequest("GET", "/accounts", nil)
	signReq.Header.Set("Authorization", "DPoP dpop."+strings.Repeat("x", 580))
	d := outbound.AcquireDPoP(h.bindings.Peek("acme").DPoP)
	defer d.Release()
	sign := testing.AllocsPerRun(200, func() {
		if _, _, err := signedCopy(signReq, d, time.Now()); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("allocations: bearer request %.0f, DPoP request %.0f, signing %.0f", bearer, bound, sign)
	if bound > bearer+sign {
		t.Errorf("a DPoP request allocates %.0f times, a bearer one %.0f and signing %.0f: the handler adds %.0f", bound, bearer, sign, bound-bearer-sign)
	}
}
