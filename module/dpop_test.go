package module

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/outbound"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
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
	k := dpoptest.NewKey(t)
	var src broker.Source = dpopSource{key: k}
	if !bound {
		src = sourceFunc(func(context.Context, broker.Request) (broker.Token, error) {
			return broker.Token{Value: broker.Secret("bearer." + strings.Repeat("x", 580)), Expiry: time.Now().Add(time.Hour)}, nil
		})
	}
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(),
		merchant: defaultSelector()}
	h.broker = broker.New(broker.Options{})
	t.Cleanup(h.broker.Close)
	b := brokertest.NewBinding("bank#test", src, broker.Request{Merchant: "acme", Organisation: "org-acme", Scopes: []string{"accounts"}})
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
// it would send in *sent, and answers 200. *got is the header of the
// request it was given.
func signing(got, sent *http.Header) caddyhttp.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		*got = r.Header
		if d := dpopOf(r.Context()); d != nil {
			out, err := d.SignCopy(r, "", "", time.Now())
			if err != nil {
				return err
			}
			*sent = out.Header
		}
		w.WriteHeader(http.StatusOK)
		return nil
	}
}

// TestDPoPHandler: a DPoP-bound token is not set on the request; the
// transport sets it, "Authorization: DPoP", with its proof, on the copy
// it sends. A route whose next does not sign sends no credential at all:
// a 401 to it becomes 502 dpop_transport_missing, the answer dropped, on
// every such request (nothing is latched), and any other answer (a
// respond handler's) passes through.
func TestDPoPHandler(t *testing.T) {
	h := dpopHandler(t, true)
	req := httptest.NewRequest("GET", "/accounts", nil)
	req.Header.Set("X-Merchant-Id", "acme")
	req.Header.Set("Authorization", "Bearer caller")
	req.Header.Set("DPoP", "caller-proof")

	var got, sent http.Header
	rec := httptest.NewRecorder()
	signedReq := caddyRequest(req.Clone(context.Background()))
	if err := h.ServeHTTP(rec, signedReq, signing(&got, &sent)); err != nil || rec.Code != http.StatusOK {
		t.Fatalf("signed route: %d %v", rec.Code, err)
	}
	// The variables are not written once next returned: a dial
	// reverse_proxy left running may read them.
	if vars := signedReq.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); vars[dpopVar] == nil {
		t.Error("the DPoP binding's variable was cleared after next returned")
	}
	if a, p := got.Values("Authorization"), got.Values("DPoP"); len(a) != 0 || len(p) != 0 {
		t.Errorf("the request passed on carries Authorization %d values, DPoP %q: want neither before the transport", len(a), p)
	}
	if a := sent.Values("Authorization"); len(a) != 1 || !strings.HasPrefix(a[0], "DPoP dpop.") {
		t.Errorf("Authorization sent: %d values, want one DPoP token", len(a))
	}
	if p := sent.Values("DPoP"); len(p) != 1 || p[0] == "caller-proof" {
		t.Errorf("DPoP sent: %q, want one proof of the transport", p)
	}

	for _, tc := range []struct {
		name     string
		status   int
		wantCode int
	}{
		{name: "401", status: http.StatusUnauthorized, wantCode: http.StatusBadGateway},
		{name: "401 again: judged alone", status: http.StatusUnauthorized, wantCode: http.StatusBadGateway},
		{name: "respond 200", status: http.StatusOK, wantCode: http.StatusOK},
		{name: "respond 404", status: http.StatusNotFound, wantCode: http.StatusNotFound},
	} {
		var seen http.Header
		unsigned := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			seen = r.Header.Clone()
			w.Header().Set("X-Upstream", "1")
			w.WriteHeader(tc.status)
			_, err := w.Write([]byte(`{"upstream":"body"}`))
			return err
		})
		rec := httptest.NewRecorder()
		if err := h.ServeHTTP(rec, caddyRequest(req.Clone(context.Background())), unsigned); err != nil {
			t.Fatal(err)
		}
		if seen == nil {
			t.Fatalf("%s: next not called", tc.name)
		}
		if _, ok := seen["Authorization"]; ok || len(seen.Values("DPoP")) != 0 {
			t.Errorf("%s: the route without the transport sent Authorization %d values, DPoP %q: want no credential at all",
				tc.name, len(seen.Values("Authorization")), seen.Values("DPoP"))
		}
		if rec.Code != tc.wantCode {
			t.Errorf("%s: status %d, want %d", tc.name, rec.Code, tc.wantCode)
		}
		if tc.wantCode == http.StatusBadGateway && (!strings.Contains(rec.Body.String(), "dpop_transport_missing") ||
			strings.Contains(rec.Body.String(), "upstream") || rec.Header().Get("X-Upstream") != "") {
			t.Errorf("%s: %v %s: want dpop_transport_missing and nothing of the answer", tc.name, rec.Header(), rec.Body)
		}
		if tc.wantCode != http.StatusBadGateway && !strings.Contains(rec.Body.String(), "upstream") {
			t.Errorf("%s: body %s: want the answer passed through", tc.name, rec.Body)
		}
	}
}

// TestDPoPHandlerErrorRoute: when next fails (reverse_proxy's 502), Caddy
// runs the handle_errors routes with the same request and variables; a
// reverse_proxy there with the DPoP transport finds the binding but sends
// no credential: the handler ended it when it returned.
func TestDPoPHandlerErrorRoute(t *testing.T) {
	h := dpopHandler(t, true)
	req := httptest.NewRequest("GET", "/accounts", nil)
	req.Header.Set("X-Merchant-Id", "acme")
	r := caddyRequest(req)
	var got, sent http.Header
	proxy := signing(&got, &sent)
	failing := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if err := proxy(w, r); err != nil {
			return err
		}
		return caddyhttp.Error(http.StatusBadGateway, errors.New("upstream unreachable"))
	})
	if err := h.ServeHTTP(httptest.NewRecorder(), r, failing); err == nil {
		t.Fatal("the failing route's error was not returned")
	}
	if len(sent.Values("Authorization")) != 1 || len(sent.Values("DPoP")) != 1 {
		t.Fatalf("the route sent Authorization %d values, DPoP %d: want the token and its proof",
			len(sent.Values("Authorization")), len(sent.Values("DPoP")))
	}

	sent = nil
	r.Header.Set("Authorization", "DPoP caller")
	r.Header.Set("DPoP", "caller-proof")
	if err := proxy(httptest.NewRecorder(), r); err != nil {
		t.Fatal(err)
	}
	if sent == nil {
		t.Fatal("the error route did not find the binding")
	}
	if a, p := sent.Values("Authorization"), sent.Values("DPoP"); len(a) != 0 || len(p) != 0 {
		t.Errorf("the error route sent Authorization %d values, DPoP %d: want no credential", len(a), len(p))
	}
}

// TestDPoPHandlerAllocations: the handler's part of a DPoP request
// allocates no more than a bearer request's (the request's DPoP binding,
// outbound.NewDPoP, stands in for the Authorization value a bearer request
// is given); the difference is the transport's signing (DPoP.SignCopy: the
// proof and the copy of the request that carries it). Sign allocates at
// most 3 more times than the proof alone (Key.Proof): the htu, and the two
// header values; the upstream's origin, whose nonce it looks up, costs
// nothing, short or long. Observe allocates nothing when the nonce is the
// one remembered.
func TestDPoPHandlerAllocations(t *testing.T) {
	req := httptest.NewRequest("GET", "/accounts", nil)
	req.Header.Set("X-Merchant-Id", "acme")
	measure := func(h *Handler) float64 {
		rec := httptest.NewRecorder()
		var got, sent http.Header
		next := signing(&got, &sent)
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
	k := h.bindings.Peek("acme").DPoP
	tok := "dpop." + strings.Repeat("x", 580)
	d := outbound.NewDPoP(k)
	d.SetToken("DPoP "+tok, dpop.ATH(tok))
	copyAndSign := testing.AllocsPerRun(200, func() {
		if _, err := d.SignCopy(signReq, "", "", time.Now()); err != nil {
			t.Fatal(err)
		}
	})
	ath := dpop.ATH(tok)
	proof := testing.AllocsPerRun(200, func() {
		if _, err := k.Proof("GET", "http://example.com/accounts", ath, "", time.Now()); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("allocations: bearer request %.0f, DPoP request %.0f, signed copy %.0f, Proof %.0f", bearer, bound, copyAndSign, proof)
	if bound > bearer+copyAndSign {
		t.Errorf("a DPoP request allocates %.0f times, a bearer one %.0f and the signed copy %.0f: the handler adds %.0f, want none", bound, bearer, copyAndSign, bound-bearer-copyAndSign)
	}
	for _, upstream := range []string{
		"http://upstream.test",
		"https://resource-server.eu-west-1.bank-api.example.com:8443", // an origin longer than 32 bytes
	} {
		signReq := httptest.NewRequest("GET", upstream+"/accounts", nil)
		answer := http.Header{"Dpop-Nonce": {"nonce-1"}}
		d.Observe(signReq, answer)
		sign := testing.AllocsPerRun(200, func() {
			if err := d.Sign(signReq, "", "", time.Now()); err != nil {
				t.Fatal(err)
			}
		})
		observe := testing.AllocsPerRun(200, func() { d.Observe(signReq, answer) })
		t.Logf("%s: Sign %.0f, Observe of the same nonce %.0f", upstream, sign, observe)
		if p, err := dpoptest.Verify(signReq.Header.Get("DPoP")); err != nil || p.Nonce != "nonce-1" {
			t.Errorf("%s: proof %+v, %v: want one with the nonce remembered", upstream, p, err)
		}
		if sign > proof+3 {
			t.Errorf("%s: Sign allocates %.0f times, the proof alone %.0f: Sign adds %.0f, want at most 3", upstream, sign, proof, sign-proof)
		}
		if observe != 0 {
			t.Errorf("%s: Observe of the nonce remembered allocates %.0f times, want none", upstream, observe)
		}
	}
}
