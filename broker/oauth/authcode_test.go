package oauth

// The authorization-code flow against zitadel's OP with the strict
// defaults of a certified provider (integration/optest).

import (
	"context"
	"crypto"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/zitadel/oidc/v3/pkg/oidc"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"github.com/tokenbroker/caddy-token-broker/integration/optest"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// callbackURL is the registered redirect URI of the consent tests.
const callbackURL = "https://cb.partner.example/consent/callback"

// approve plays the merchant's browser: it opens authURL, logs in and
// approves at the server, and returns the query the server sends to the
// callback URL.
func approve(t *testing.T, srv *optest.Server, authURL string) url.Values {
	t.Helper()
	back, err := srv.Authorize(authURL, true)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(back.String(), callbackURL+"?") {
		t.Fatalf("the server redirected to %s, want the callback", back)
	}
	return back.Query()
}

// consentFixture is a provider with the consent flow against zitadel.
type consentFixture struct {
	op    *optest.Server
	store *savingStore
	src   *RefreshToken
	flow  *AuthCode
	pend  *Pendings
	clock *clocktest.Clock
}

// newConsentFixture starts the server with the client "bank-client"
// (changed by mods) and the flow of the provider "bank" against it.
func newConsentFixture(t *testing.T, o optest.Options, method AuthMethod, par bool, mods ...func(*optest.Client)) *consentFixture {
	t.Helper()
	key := testRSAKey(t)
	client := &optest.Client{ID: "bank-client", Secret: secretValue, Method: oidc.AuthMethodBasic, Redirects: []string{callbackURL}}
	switch method {
	case ClientSecretPost:
		client.Method = oidc.AuthMethodPost
	case PrivateKeyJWT:
		client.Secret, client.Method = "", oidc.AuthMethodPrivateKeyJWT
		client.Keys = map[string]crypto.PublicKey{"k1": key.Public()}
	}
	for _, m := range mods {
		m(client)
	}
	srv := optest.Start(t, o, client)
	cfg := Config{Name: "bank", Issuer: srv.URL, ClientID: client.ID, AuthMethod: method}
	if method == PrivateKeyJWT {
		cfg.Signer, cfg.AssertionAudience = mustSigner(t, key, PS256, "k1"), srv.URL
	} else {
		cfg.ClientSecret = secretValue
	}
	store := &savingStore{}
	src, err := NewRefreshToken(cfg, store)
	if err != nil {
		t.Fatal(err)
	}
	clock := newClock()
	pend := &Pendings{Store: &MemoryPendingStore{}, Now: clock.Now}
	flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, ReturnURLs: []string{"https://app.partner.example/consent/"}, PAR: par}, pend)
	if err != nil {
		t.Fatal(err)
	}
	return &consentFixture{op: srv, store: store, src: src, flow: flow, pend: pend, clock: clock}
}

// savingStore is a MemoryStore that counts the refresh tokens saved,
// and fails the saves while failing is set.
type savingStore struct {
	MemoryStore
	saves   atomic.Int64
	failing atomic.Bool
}

// Save counts the save and stores rt, or fails while failing is set.
func (s *savingStore) Save(ctx context.Context, key string, rt broker.Secret) error {
	if s.failing.Load() {
		return errors.New("the test store refuses saves")
	}
	s.saves.Add(1)
	return s.MemoryStore.Save(ctx, key, rt)
}

// Saves returns how many times Save was called.
func (s *savingStore) Saves() int { return int(s.saves.Load()) }

// consent runs one whole consent for merchant and returns the callback's
// query (already used) and result.
func (f *consentFixture) consent(t *testing.T, merchant string) (url.Values, Result) {
	t.Helper()
	ctx := context.Background()
	link, err := f.flow.NewLink(ctx, merchant, "https://app.partner.example/consent/done", "")
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(link.URL)
	authURL, rec, err := f.flow.Start(ctx, u.Query().Get("link"), u.Host)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if rec.Merchant != merchant {
		t.Fatalf("Start is for %q", rec.Merchant)
	}
	q := approve(t, f.op, authURL)
	res, err := f.flow.Callback(ctx, u.Host, q)
	if err != nil {
		t.Fatalf("Callback: %v", err)
	}
	return q, res
}

// TestAuthCodeFlowAgainstZitadel: a consent link, the merchant's login and
// approval, the callback; then the merchant's tokens come from the refresh
// token the callback stored. With PAR off, on by configuration, and
// required by the server; with secrets and private_key_jwt.
func TestAuthCodeFlowAgainstZitadel(t *testing.T) {
	rows := []struct {
		name       string
		method     AuthMethod
		par        bool // configured
		requirePAR bool // advertised by the server
		iss        bool
	}{
		{"client_secret_basic, no PAR", ClientSecretBasic, false, false, false},
		{"client_secret_basic, PAR configured, iss", ClientSecretBasic, true, false, true},
		{"client_secret_post, PAR required by the server", ClientSecretPost, false, true, false},
		{"private_key_jwt, no PAR, iss", PrivateKeyJWT, false, false, true},
		{"private_key_jwt, PAR required by the server", PrivateKeyJWT, false, true, true},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			f := newConsentFixture(t, optest.Options{RequirePAR: tc.requirePAR, Iss: tc.iss}, tc.method, tc.par)
			q, res := f.consent(t, "acme")
			if res.Merchant != "acme" || res.ReturnURL != "https://app.partner.example/consent/done" || len(res.Fingerprint) != 8 {
				t.Errorf("result %+v", res)
			}
			if wantPAR := tc.par || tc.requirePAR; (f.op.Pushed.Load() == 1) != wantPAR {
				t.Errorf("pushed %d requests, PAR wanted: %v", f.op.Pushed.Load(), wantPAR)
			}
			rt, err := f.store.Load(context.Background(), f.src.StoreKey("acme"))
			if err != nil || !f.op.Storage.RefreshTokenValid(rt.Reveal()) {
				t.Fatalf("stored refresh token: %v (valid at the server: false)", err)
			}
			tok, err := f.src.Token(context.Background(), broker.Request{Merchant: "acme"})
			if err != nil || tok.Value == "" {
				t.Fatalf("Token after consent: %v", err)
			}
			if n := f.op.Count("refresh_token"); n != 1 {
				t.Errorf("%d refresh requests, want 1", n)
			}
			if n := f.op.Count("authorization_code"); n != 1 {
				t.Errorf("%d code exchanges, want 1", n)
			}
			// Nothing the flow keeps is readable in its store.
			if n := stored(f.pend.Store.(*MemoryPendingStore)); n != 0 {
				t.Errorf("%d consents left pending", n)
			}
			_ = q
		})
	}
}

// TestAuthCodeRefusals: each refused callback or start, with its reason;
// none stores a refresh token, and no error quotes a code, state or
// verifier.
func TestAuthCodeRefusals(t *testing.T) {
	ctx := context.Background()
	// begin opens a consent link and approves at the server; it returns
	// the callback query, not yet used.
	begin := func(t *testing.T, f *consentFixture) url.Values {
		link, err := f.flow.NewLink(ctx, "acme", "", "")
		if err != nil {
			t.Fatal(err)
		}
		u, _ := url.Parse(link.URL)
		authURL, _, err := f.flow.Start(ctx, u.Query().Get("link"), u.Host)
		if err != nil {
			t.Fatal(err)
		}
		return approve(t, f.op, authURL)
	}
	const host = "cb.partner.example"
	// longDescription is an error_description longer than a message may
	// quote (scrub.MaxText).
	longDescription := strings.Repeat("the bank said no. ", scrub.MaxText/4)
	rows := []struct {
		name   string
		iss    bool
		reason string
		run    func(t *testing.T, f *consentFixture) error
	}{
		{"replayed state", false, ReasonUnknownState, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			if _, err := f.flow.Callback(ctx, host, q); err != nil {
				t.Fatalf("first callback: %v", err)
			}
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"unknown state", false, ReasonUnknownState, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q.Set("state", randomString(32))
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"no state", false, ReasonUnknownState, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q.Del("state")
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"expired link", false, ReasonExpired, func(t *testing.T, f *consentFixture) error {
			link, err := f.flow.NewLink(ctx, "acme", "", "")
			if err != nil {
				t.Fatal(err)
			}
			f.clock.Add(DefaultLinkTTL + time.Second)
			u, _ := url.Parse(link.URL)
			_, _, err = f.flow.Start(ctx, u.Query().Get("link"), u.Host)
			return err
		}},
		{"replayed link", false, ReasonUnknownState, func(t *testing.T, f *consentFixture) error {
			link, err := f.flow.NewLink(ctx, "acme", "", "")
			if err != nil {
				t.Fatal(err)
			}
			u, _ := url.Parse(link.URL)
			authURL, _, err := f.flow.Start(ctx, u.Query().Get("link"), u.Host)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.flow.Callback(ctx, host, approve(t, f.op, authURL)); err != nil {
				t.Fatal(err)
			}
			_, _, err = f.flow.Start(ctx, u.Query().Get("link"), u.Host)
			return err
		}},
		{"expired state", false, ReasonExpired, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			f.clock.Add(StateTTL + time.Second)
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"callback for another provider", false, ReasonWrongProvider, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			cfg := f.src.cfg
			cfg.Name = "other-bank"
			other, err := NewRefreshToken(cfg, f.store)
			if err != nil {
				t.Fatal(err)
			}
			flow, err := NewAuthCode(other, AuthCodeConfig{RedirectURIs: []string{callbackURL}}, f.pend)
			if err != nil {
				t.Fatal(err)
			}
			_, err = flow.Callback(ctx, host, q)
			return err
		}},
		{"callback on another host", false, ReasonWrongCallback, func(t *testing.T, f *consentFixture) error {
			_, err := f.flow.Callback(ctx, "evil.example", begin(t, f))
			return err
		}},
		{"wrong iss", true, ReasonWrongIssuer, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			if q.Get("iss") != f.op.URL {
				t.Fatalf("the server sent iss %q", q.Get("iss"))
			}
			q.Set("iss", "https://mix-up.example")
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"iss missing though advertised", true, ReasonWrongIssuer, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q.Del("iss")
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"iss sent by a server that does not advertise it, wrong", false, ReasonWrongIssuer, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q.Set("iss", "https://mix-up.example")
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"code of another consent (PKCE verifier mismatch)", false, ReasonExchangeFailed, func(t *testing.T, f *consentFixture) error {
			other := begin(t, f)
			q := begin(t, f)
			q.Set("code", other.Get("code"))
			_, err := f.flow.Callback(ctx, host, q)
			var ae *broker.APIError
			if !errors.As(err, &ae) || ae.StatusCode != http.StatusBadRequest {
				t.Errorf("want the server's refusal, got %v", err)
			}
			return err
		}},
		{"code without its PKCE verifier", false, ReasonExchangeFailed, func(t *testing.T, f *consentFixture) error {
			// The state's record loses its verifier, so that the callback
			// sends the real code with an empty code_verifier: the same as
			// none (RFC 6749 §3.1), a PKCE downgrade the server refuses.
			q := begin(t, f)
			rec, err := f.pend.take(ctx, kindState, q.Get("state"))
			if err != nil || rec.Verifier == "" {
				t.Fatalf("the state's record: %+v, %v", rec, err)
			}
			rec.Verifier = ""
			if err := f.pend.put(ctx, kindState, q.Get("state"), rec); err != nil {
				t.Fatal(err)
			}
			_, err = f.flow.Callback(ctx, host, q)
			var ae *broker.APIError
			if !errors.As(err, &ae) || ae.StatusCode != http.StatusBadRequest || ae.Code != "invalid_request" {
				t.Errorf("want the server's refusal of a code without its verifier, got %v", err)
			}
			return err
		}},
		{"access denied", false, ReasonDenied, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q = url.Values{"state": q["state"], "error": {"access_denied"}, "error_description": {"the user said no"}}
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"access denied with a long description", false, ReasonDenied, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q = url.Values{"state": q["state"], "error": {"access_denied"}, "error_description": {longDescription}}
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"provider error with a long description", false, ReasonProviderError, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q = url.Values{"state": q["state"], "error": {"invalid_scope"}, "error_description": {longDescription}}
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"return URL not allow-listed", false, ReasonReturnURL, func(t *testing.T, f *consentFixture) error {
			_, err := f.flow.NewLink(ctx, "acme", "https://evil.example/consent/done", "")
			return err
		}},
		{"return URL outside the allowed path", false, ReasonReturnURL, func(t *testing.T, f *consentFixture) error {
			_, err := f.flow.NewLink(ctx, "acme", "https://app.partner.example/other", "")
			return err
		}},
		{"return URL escaping the allowed path", false, ReasonReturnURL, func(t *testing.T, f *consentFixture) error {
			_, err := f.flow.NewLink(ctx, "acme", "https://app.partner.example/consent/%2e%2e/admin", "")
			return err
		}},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			f := newConsentFixture(t, optest.Options{Iss: tc.iss}, ClientSecretBasic, false)
			saves := 0
			err := tc.run(t, f)
			var ce *ConsentError
			if !errors.As(err, &ce) || ce.Reason != tc.reason {
				t.Fatalf("err = %v, want a *ConsentError %s", err, tc.reason)
			}
			if tc.name == "replayed state" || tc.name == "replayed link" {
				saves = 1
			}
			if f.store.Saves() != saves {
				t.Errorf("%d refresh tokens saved, want %d", f.store.Saves(), saves)
			}
			checkNoSecrets(t, err)
			if strings.Contains(err.Error(), longDescription[:scrub.MaxText+1]) {
				t.Errorf("the error quotes more than %d bytes of the error_description: %v", scrub.MaxText, err)
			}
			if strings.Contains(err.Error(), "code=") || strings.Contains(err.Error(), "state=") {
				t.Errorf("the error quotes a parameter: %v", err)
			}
		})
	}
}

// TestConsentLinkStartedTwice: one link started twice (two tabs, a
// double click) gets two authorization states, each with its own state,
// PKCE challenge and nonce; the first callback with a code consumes the
// link and stores the refresh token; the other, whenever it comes back,
// is refused as a used link (unknown_state) before its code is exchanged, so the
// first refresh token stays. A callback without a code (the merchant
// denied in one tab) leaves the link to the other; a link that expired
// after its start is still claimed by the state's callback.
func TestConsentLinkStartedTwice(t *testing.T) {
	ctx := context.Background()
	const host = "cb.partner.example"
	for _, tc := range []struct {
		name string
		// firstDenies: the tab coming back first was denied at the bank.
		firstDenies bool
		// expire moves the clock past the link's expiry after both starts.
		expire bool
	}{
		{name: "second tab back first"},
		{name: "first tab denied", firstDenies: true},
		{name: "link expired after the starts", expire: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, false)
			id := newLinkID(t, f.flow, "acme")
			browser := NewBrowser() // both tabs share the browser's cookie
			var authURLs []string
			for range 2 {
				authURL, rec, err := f.flow.Start(ctx, id, host, browser)
				if err != nil || rec.Merchant != "acme" {
					t.Fatalf("Start: %v %+v", err, rec)
				}
				authURLs = append(authURLs, authURL)
			}
			u0, _ := url.Parse(authURLs[0])
			u1, _ := url.Parse(authURLs[1])
			for _, p := range []string{"state", "code_challenge", "nonce"} {
				if a, b := u0.Query().Get(p), u1.Query().Get(p); a == "" || a == b {
					t.Fatalf("the two starts share %s", p)
				}
			}
			if tc.expire {
				f.clock.Add(DefaultLinkTTL + time.Second)
			}
			// The tabs come back in the other order: tab 2, then tab 1.
			var first, second url.Values
			if tc.firstDenies {
				back, err := f.op.Authorize(authURLs[1], false)
				if err != nil {
					t.Fatal(err)
				}
				first, second = back.Query(), approve(t, f.op, authURLs[0])
			} else {
				first, second = approve(t, f.op, authURLs[1]), approve(t, f.op, authURLs[0])
			}
			res, err := f.flow.Callback(ctx, host, first, browser)
			var ce *ConsentError
			if tc.firstDenies {
				if !errors.As(err, &ce) || ce.Reason != ReasonDenied {
					t.Fatalf("denied tab's callback = %v, want denied", err)
				}
				if res, err = f.flow.Callback(ctx, host, second, browser); err != nil {
					t.Fatalf("the other tab's callback after a denial = %v, want the consent", err)
				}
				if f.store.Saves() != 1 {
					t.Fatalf("%d refresh tokens saved, want 1", f.store.Saves())
				}
				return
			}
			if err != nil {
				t.Fatalf("first callback = %v", err)
			}
			exchanges := f.op.Count("authorization_code")
			_, err = f.flow.Callback(ctx, host, second, browser)
			if !errors.As(err, &ce) || ce.Reason != ReasonUnknownState || ce.Merchant != "acme" {
				t.Fatalf("second callback = %v, want unknown_state (a used link) for acme", err)
			}
			checkNoSecrets(t, err)
			if n := f.op.Count("authorization_code"); n != exchanges {
				t.Errorf("the second tab's code was exchanged (%d exchanges, %d before)", n, exchanges)
			}
			rt, lerr := f.store.Load(ctx, f.src.StoreKey("acme"))
			if f.store.Saves() != 1 || lerr != nil || rt.Fingerprint() != res.Fingerprint {
				t.Errorf("%d saves, stored %v (%v); want the first callback's %s alone", f.store.Saves(), rt.Fingerprint(), lerr, res.Fingerprint)
			}
			if _, _, err := f.flow.Start(ctx, id, host, browser); !errors.As(err, &ce) || ce.Reason != ReasonUnknownState && ce.Reason != ReasonExpired {
				t.Errorf("Start of the used link = %v, want it refused", err)
			}
		})
	}
}

// TestConsentLinkBackAfterFailedCallback: the callback that claims a
// link but whose code exchange or refresh token save fails puts the link
// back: the merchant starts it again and consents.
func TestConsentLinkBackAfterFailedCallback(t *testing.T) {
	ctx := context.Background()
	const host = "cb.partner.example"
	for _, tc := range []struct {
		name   string
		reason string
		// spoil makes the first callback fail, given its query.
		spoil func(f *consentFixture, q url.Values)
	}{
		{"code exchange fails", ReasonExchangeFailed, func(_ *consentFixture, q url.Values) { q.Set("code", "not-the-code") }},
		{"save fails", ReasonStoreFailure, func(f *consentFixture, _ url.Values) { f.store.failing.Store(true) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, false)
			id := newLinkID(t, f.flow, "acme")
			authURL, _, err := f.flow.Start(ctx, id, host)
			if err != nil {
				t.Fatal(err)
			}
			q := approve(t, f.op, authURL)
			tc.spoil(f, q)
			var ce *ConsentError
			_, err = f.flow.Callback(ctx, host, q)
			if !errors.As(err, &ce) || ce.Reason != tc.reason {
				t.Fatalf("failing callback = %v, want %s", err, tc.reason)
			}
			checkNoSecrets(t, err)
			f.store.failing.Store(false)
			if _, err := f.flow.CheckLink(ctx, id, host); err != nil {
				t.Fatalf("the link after the failed callback: %v, want it usable", err)
			}
			authURL, _, err = f.flow.Start(ctx, id, host)
			if err != nil {
				t.Fatalf("Start again: %v", err)
			}
			if _, err := f.flow.Callback(ctx, host, approve(t, f.op, authURL)); err != nil || f.store.Saves() != 1 {
				t.Fatalf("the second try: %v, %d saves; want the consent", err, f.store.Saves())
			}
			if _, err := f.flow.CheckLink(ctx, id, host); !errors.As(err, &ce) || ce.Reason != ReasonUnknownState {
				t.Errorf("the link after the consent: %v, want it used", err)
			}
		})
	}
}

// TestConsentLinkClaimedOnce: the callbacks of several starts of one
// link, all approved, arrive at once: exactly one claims the link, has
// its code exchanged and stores a refresh token; the others are refused
// as a used link.
func TestConsentLinkClaimedOnce(t *testing.T) {
	ctx := context.Background()
	const host, n = "cb.partner.example", 6
	f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, false)
	id := newLinkID(t, f.flow, "acme")
	var callbacks []url.Values
	for range n {
		authURL, _, err := f.flow.Start(ctx, id, host)
		if err != nil {
			t.Fatal(err)
		}
		callbacks = append(callbacks, approve(t, f.op, authURL))
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, q := range callbacks {
		wg.Go(func() { _, errs[i] = f.flow.Callback(ctx, host, q) })
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		var ce *ConsentError
		switch {
		case err == nil:
			ok++
		case !errors.As(err, &ce) || ce.Reason != ReasonUnknownState:
			t.Errorf("a callback = %v, want success or unknown_state", err)
		}
	}
	if ok != 1 || f.op.Count("authorization_code") != 1 || f.store.Saves() != 1 {
		t.Errorf("%d callbacks succeeded, %d codes exchanged, %d refresh tokens saved; want 1 each", ok, f.op.Count("authorization_code"), f.store.Saves())
	}
}

// TestConsentAgainAfterInvalidGrant: once the server refuses the refresh
// token the merchant needs consent; a new consent restores the service
// with the same source, without a restart.
func TestConsentAgainAfterInvalidGrant(t *testing.T) {
	f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, false)
	ctx := context.Background()
	f.consent(t, "acme")
	rt, _ := f.store.Load(ctx, f.src.StoreKey("acme"))
	if err := f.op.Revoke("bank-client", secretValue, rt.Reveal()); err != nil { // revoked at the bank
		t.Fatal(err)
	}

	_, err := f.src.Token(ctx, broker.Request{Merchant: "acme"})
	var cr *ConsentRequiredError
	if !errors.As(err, &cr) || cr.Merchant != "acme" {
		t.Fatalf("Token with a revoked refresh token = %v, want *ConsentRequiredError", err)
	}
	if st := f.src.ConsentStatus("acme"); st.ConsentRequiredSince.IsZero() {
		t.Errorf("status after invalid_grant = %+v, want consent required", st)
	}
	f.consent(t, "acme")
	if st := f.src.ConsentStatus("acme"); !st.ConsentRequiredSince.IsZero() {
		t.Errorf("status after the new consent = %+v", st)
	}
	if tok, err := f.src.Token(ctx, broker.Request{Merchant: "acme"}); err != nil || tok.Value == "" {
		t.Fatalf("Token after the new consent = %v", err)
	}
}

// TestPendingsSealed: the store holds neither the link id, the state nor
// the verifier, and a record does not open under another secret.
func TestPendingsSealed(t *testing.T) {
	ms := &MemoryPendingStore{}
	p := &Pendings{Store: ms, Now: newClock().Now}
	ctx := context.Background()
	secret := randomString(32)
	rec := Pending{Provider: "bank", Merchant: "acme", Verifier: "verifier-" + secret, Expires: p.Now().Add(time.Minute)}
	if err := p.put(ctx, kindState, secret, rec); err != nil {
		t.Fatal(err)
	}
	for k, v := range ms.m {
		for _, s := range []string{secret, rec.Verifier, "acme", base64.RawURLEncoding.EncodeToString([]byte(secret))} {
			if strings.Contains(k, s) || strings.Contains(string(v.val), s) {
				t.Errorf("the store shows %q", s)
			}
		}
	}
	if _, err := p.take(ctx, kindLink, secret); !errors.Is(err, ErrUnknownPending) {
		t.Errorf("taken as another kind: %v", err)
	}
	got, err := p.take(ctx, kindState, secret)
	if err != nil || got.Verifier != rec.Verifier {
		t.Fatalf("take = %+v, %v", got, err)
	}
	if _, err := p.take(ctx, kindState, secret); !errors.Is(err, ErrUnknownPending) {
		t.Errorf("second take: %v", err)
	}
}

// TestConsentStartAfterCancelledDiscovery: a merchant who leaves while the
// provider is being discovered does not make the next merchant's consent
// wait for the pause that follows a failed discovery.
func TestConsentStartAfterCancelledDiscovery(t *testing.T) {
	arrived, release := make(chan struct{}, 1), make(chan struct{})
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/.well-known/openid-configuration" {
			http.NotFound(w, r)
			return
		}
		arrived <- struct{}{}
		<-release
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"issuer":%q,"authorization_endpoint":%q,"token_endpoint":%q,"jwks_uri":%q}`,
			srv.URL, srv.URL+"/authorize", srv.URL+"/token", srv.URL+"/jwks")
	}))
	defer srv.Close()
	src, err := NewRefreshToken(Config{Name: "bank", Issuer: srv.URL, ClientID: "bank-client", ClientSecret: secretValue}, &MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, ReturnURLs: []string{"https://app.partner.example/consent/"}},
		&Pendings{Store: &MemoryPendingStore{}, Now: newClock().Now})
	if err != nil {
		t.Fatal(err)
	}
	start := func(ctx context.Context) error {
		link, err := flow.NewLink(context.Background(), "acme", "https://app.partner.example/consent/done", "")
		if err != nil {
			return fmt.Errorf("NewLink: %w", err)
		}
		u, _ := url.Parse(link.URL)
		_, _, err = flow.Start(ctx, u.Query().Get("link"), u.Host)
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() { first <- start(ctx) }()
	<-arrived // the discovery is under way
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Fatalf("Start whose caller left: %v, want context.Canceled", err)
	}
	close(release)
	if err := start(context.Background()); err != nil {
		t.Fatalf("Start after one whose caller left: %v", err)
	}
}

// leavingStore is a Store whose caller leaves (leave cancels its
// context) as it asks for the lock, and which honours that context.
type leavingStore struct {
	Store
	leave func()
}

// Lock calls leave, then fails when ctx is done.
func (s *leavingStore) Lock(ctx context.Context, key string) (func(), error) {
	s.leave()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return s.Store.Lock(ctx, key)
}

// TestCallbackKeepsTheConsentWhenTheBrowserLeaves: once the callback has
// consumed the state, the browser leaving (its request's context
// cancelled) while the code is exchanged, while the issuer's keys are
// fetched to verify the ID token, or as the store's lock is asked for
// does not lose the merchant's consent: the state and the code are
// spent, so the refresh token is stored all the same.
func TestCallbackKeepsTheConsentWhenTheBrowserLeaves(t *testing.T) {
	for _, tc := range []struct {
		name string
		path string // the request to the server during which the browser leaves; "" for none
		lock bool   // the browser leaves as the store's lock is asked for
	}{
		{name: "during the code exchange", path: "/oauth/token"},
		{name: "during the fetch of the issuer's keys", path: "/keys"},
		{name: "as the store's lock is asked for", lock: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, false)
			ctx, leave := context.WithCancel(context.Background())
			defer leave()
			var left atomic.Bool
			if tc.lock {
				f.src.store = &leavingStore{Store: f.store, leave: func() {
					left.Store(true)
					leave()
				}}
			}
			if tc.path != "" {
				next := f.src.cfg.Client.Transport
				if next == nil {
					next = http.DefaultTransport
				}
				f.src.cfg.Client.Transport = roundTripFunc(func(r *http.Request) (*http.Response, error) {
					if r.URL.Path == tc.path {
						left.Store(true)
						leave()
					}
					return next.RoundTrip(r)
				})
			}
			authURL, host := startConsent(t, f.flow, "acme")
			_, err := f.flow.Callback(ctx, host, approve(t, f.op, authURL))
			if !left.Load() {
				t.Fatalf("the browser never left %s", tc.name)
			}
			if err != nil {
				t.Fatalf("Callback whose browser left %s: %v", tc.name, err)
			}
			if _, err := f.store.Load(context.Background(), f.src.StoreKey("acme")); err != nil {
				t.Errorf("the refresh token of the exchanged code was not stored: %v", err)
			}
		})
	}
}

// TestIssWithoutConfiguredIssuer: a provider configured with token_url
// and authorization_url (no issuer) whose authorization response carries
// iss (RFC 9207) is refused, and the error says what to configure instead
// of comparing the iss with an empty issuer.
func TestIssWithoutConfiguredIssuer(t *testing.T) {
	ctx := context.Background()
	flow, _ := newLimitFlow(t, newClock(), LinkLimits{})
	authURL, host := startConsent(t, flow, "acme")
	au, _ := url.Parse(authURL)
	state := au.Query().Get("state")
	_, err := flow.Callback(ctx, host, url.Values{"state": {state}, "code": {"c1"}, "iss": {"https://bank.example"}})
	var ce *ConsentError
	if !errors.As(err, &ce) || ce.Reason != ReasonWrongIssuer {
		t.Fatalf("Callback = %v, want %s", err, ReasonWrongIssuer)
	}
	if msg := err.Error(); !strings.Contains(msg, "set issuer") || strings.Contains(msg, `issuer ""`) {
		t.Errorf("the error does not say to configure the issuer: %s", msg)
	}
}

// TestProviderErrorWithoutState: a provider that redirects back with an
// error but without the state (RFC 6749 §4.1.2.1 wants it; some omit it)
// cannot be tied to a consent, and the refusal names the provider's error
// code instead of only an unknown state.
func TestProviderErrorWithoutState(t *testing.T) {
	ctx := context.Background()
	flow, _ := newLimitFlow(t, newClock(), LinkLimits{})
	u, _ := url.Parse(callbackURL)
	q := url.Values{"error": {"unauthorized_client"}, "error_description": {"client not allowed"}}
	_, err := flow.Callback(ctx, u.Host, q)
	var ce *ConsentError
	if !errors.As(err, &ce) || ce.Reason != ReasonUnknownState {
		t.Fatalf("Callback = %v, want %s", err, ReasonUnknownState)
	}
	if msg := err.Error(); !strings.Contains(msg, "the redirect carries error=unauthorized_client: client not allowed") {
		t.Errorf("the error does not name the provider's error: %s", msg)
	}
}

// TestUnrequestedIDTokenIgnored: a provider configured with token_url
// (openid cannot be asked without an issuer) whose code exchange answers
// with an id_token nobody asked for: the id_token is a value the client
// does not use and ignores (RFC 6749 §5.1), and the consent is stored.
func TestUnrequestedIDTokenIgnored(t *testing.T) {
	ctx := context.Background()
	s := &stub{status: 200, body: `{"access_token":"at-1","token_type":"Bearer","expires_in":60,"refresh_token":"rt-1","id_token":"eyJhbGciOiJSUzI1NiJ9.e30.c2ln"}`}
	srv := startStub(t, s)
	clock := newClock()
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: secretValue, Now: clock.Now}, &MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, AuthorizationURL: srv.URL + "/authorize",
		Scopes: []string{"accounts", "offline_access"}}, &Pendings{Store: &MemoryPendingStore{Now: clock.Now}})
	if err != nil {
		t.Fatal(err)
	}
	authURL, host := startConsent(t, flow, "acme")
	au, _ := url.Parse(authURL)
	state := au.Query().Get("state")
	res, err := flow.Callback(ctx, host, url.Values{"state": {state}, "code": {"c1"}})
	if err != nil {
		t.Fatalf("Callback = %v, want the consent stored", err)
	}
	if rt, err := src.Store().Load(ctx, src.StoreKey("acme")); err != nil || rt.Reveal() != "rt-1" || res.Merchant != "acme" {
		t.Errorf("stored %v, %v; result %+v", rt, err, res)
	}
}

// TestFormEncodedCodeExchangeWithoutIDToken: a discovered provider (an
// issuer, no openid asked) whose code exchange answers form-encoded
// (RFC 6749 allows it; x/oauth2's Token.Extra then reads a missing
// id_token as "") without an id_token: there is no ID token to verify,
// and the consent is stored.
func TestFormEncodedCodeExchangeWithoutIDToken(t *testing.T) {
	issuer := startIssuer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-www-form-urlencoded")
		fmt.Fprint(w, "access_token=at-1&token_type=bearer&expires_in=60&refresh_token=rt-1")
	})
	ctx := context.Background()
	src, err := NewRefreshToken(Config{Name: "bank", Issuer: issuer, ClientID: "bank-client", ClientSecret: secretValue}, &MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"accounts", "offline_access"}},
		&Pendings{Store: &MemoryPendingStore{}})
	if err != nil {
		t.Fatal(err)
	}
	authURL, host := startConsent(t, flow, "acme")
	au, _ := url.Parse(authURL)
	if _, err := flow.Callback(ctx, host, url.Values{"state": {au.Query().Get("state")}, "code": {"c1"}}); err != nil {
		t.Fatalf("Callback = %v, want the consent stored", err)
	}
	if rt, err := src.Store().Load(ctx, src.StoreKey("acme")); err != nil || rt.Reveal() != "rt-1" {
		t.Errorf("stored %v, %v", rt, err)
	}
}

// TestIDTokenRefusals: a discovered provider (an issuer) whose code
// exchange answers with an id_token that is forged or not a string is
// refused as invalid_id_token, whether openid was asked or not; an absent,
// null or empty id_token is no ID token (refused only when openid was
// asked). The refresh token is not stored when refused.
func TestIDTokenRefusals(t *testing.T) {
	const forged = `"eyJhbGciOiJSUzI1NiJ9.e30.c2ln"`
	var idToken atomic.Value
	issuer := startIssuer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		id := ""
		if v := idToken.Load().(string); v != "" {
			id = `,"id_token":` + v
		}
		fmt.Fprintf(w, `{"access_token":"at-1","token_type":"Bearer","expires_in":60,"refresh_token":"rt-1"%s}`, id)
	})
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		openid  bool
		idToken string // JSON value; "" leaves id_token out
		refused bool
	}{
		{"openid, forged", true, forged, true},
		{"openid, a number", true, `123`, true},
		{"openid, absent", true, "", true},
		{"not asked, forged", false, forged, true},
		{"not asked, a number", false, `123`, true},
		{"not asked, an object", false, `{}`, true},
		{"not asked, true", false, `true`, true},
		{"not asked, null", false, `null`, false},
		{"not asked, empty", false, `""`, false},
		{"not asked, absent", false, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			idToken.Store(tc.idToken)
			src, err := NewRefreshToken(Config{Name: "bank", Issuer: issuer, ClientID: "bank-client", ClientSecret: secretValue}, &MemoryStore{})
			if err != nil {
				t.Fatal(err)
			}
			scopes := []string{"accounts", "offline_access"}
			if tc.openid {
				scopes = append(scopes, "openid")
			}
			flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: scopes}, &Pendings{Store: &MemoryPendingStore{}})
			if err != nil {
				t.Fatal(err)
			}
			authURL, host := startConsent(t, flow, "acme")
			au, _ := url.Parse(authURL)
			_, err = flow.Callback(ctx, host, url.Values{"state": {au.Query().Get("state")}, "code": {"c1"}})
			var ce *ConsentError
			if refused := errors.As(err, &ce) && ce.Reason == ReasonInvalidIDToken; refused != tc.refused || !tc.refused && err != nil {
				t.Fatalf("Callback = %v, want refused as %s: %v", err, ReasonInvalidIDToken, tc.refused)
			}
			if _, err := src.Store().Load(ctx, src.StoreKey("acme")); errors.Is(err, ErrNoRefreshToken) != tc.refused {
				t.Errorf("stored refresh token: %v, want stored: %v", err, !tc.refused)
			}
		})
	}
}

// startIssuer starts an authorization server with a discovery document,
// an empty key set and token as its token endpoint, and returns its
// issuer.
func startIssuer(t *testing.T, token http.HandlerFunc) string {
	t.Helper()
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/.well-known/openid-configuration":
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"issuer":%q,"authorization_endpoint":%q,"token_endpoint":%q,"jwks_uri":%q}`,
				srv.URL, srv.URL+"/authorize", srv.URL+"/token", srv.URL+"/jwks")
		case "/jwks":
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{"keys":[]}`)
		case "/token":
			token(w, r)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}
