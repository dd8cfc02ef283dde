package nuapay

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// gatekeeper is a scripted Gatekeeper token endpoint that records what it got.
type gatekeeper struct {
	status  int
	body    string
	header  http.Header
	gotPath string
	gotAuth string
	gotBody map[string]any
}

func (g *gatekeeper) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	g.gotPath = r.URL.EscapedPath()
	g.gotAuth = r.Header.Get("Authorization")
	g.gotBody = nil
	_ = json.NewDecoder(r.Body).Decode(&g.gotBody)
	for k, v := range g.header {
		w.Header()[k] = v
	}
	w.WriteHeader(g.status)
	io.WriteString(w, g.body)
}

func newNuapayTest(t *testing.T, g *gatekeeper) *Source {
	t.Helper()
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	n, err := New(Config{BaseURL: srv.URL + "/gk/", APIKey: "partner-key", Lifetime: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

const okEnvelope = `{"uri":"/x","data":{"id":"tok-id-1","uri":"/x","accessToken":"eyJ.a.b","tokenType":"BEARER",
 "expiryTime":%d,"scopes":["openbanking_pisp"],"status":"ACTIVE","createdTimestamp":1544975872000,"revokedTimestamp":null,
 "links":[{"id":"tok-id-1","resourceType":"revoketoken","uri":"/tokens/tok-id-1/revoke"}]}}`

func TestNuapayTokenRequest(t *testing.T) {
	sent := time.Now()
	g := &gatekeeper{status: 201, body: strings.Replace(okEnvelope, "%d", "32503680000000", 1)}
	n := newNuapayTest(t, g)
	tok, err := n.Token(context.Background(), broker.Request{Merchant: "acme", Organisation: "org-acme", Scopes: []string{"openbanking_pisp"}, Lifetime: 15 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if want := "Basic " + base64.StdEncoding.EncodeToString([]byte("partner-key:")); g.gotAuth != want {
		t.Errorf("auth = %q, want %q (API key with an empty password)", g.gotAuth, want)
	}
	if g.gotPath != "/gk/organisations/org-acme/tokens" {
		t.Errorf("path = %q", g.gotPath)
	}
	if g.gotBody["expiresIn"] != float64(900) || g.gotBody["scopes"].([]any)[0] != "openbanking_pisp" {
		t.Errorf("body = %v", g.gotBody)
	}
	if tok.Value.Reveal() != "eyJ.a.b" || tok.ID != "tok-id-1" || tok.Type != "Bearer" {
		t.Errorf("token = %+v", tok)
	}
	// expiryTime in year 3000 is capped to what was asked for.
	if d := tok.Expiry.Sub(sent); d < 15*time.Minute-time.Second || d > 15*time.Minute+time.Second {
		t.Errorf("expiry in %s, want 15m", d)
	}
}

func TestNuapayExpiryTimeIsMilliseconds(t *testing.T) {
	now := time.Now()
	body := []byte(strings.Replace(okEnvelope, "%d", jsonInt(now.Add(10*time.Second).UnixMilli()), 1))
	tok, err := ParseToken(http.StatusCreated, body, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if d := tok.Expiry.Sub(now); d < 9*time.Second || d > 11*time.Second {
		t.Fatalf("expiry in %s, want 10s", d)
	}
}

func jsonInt(v int64) string { b, _ := json.Marshal(v); return string(b) }

// An expiryTime in milliseconds written as a JSON number with a fraction
// or an exponent (a look-alike that computes it in floating point), or as
// a string holding a number, is read like an integer one; one past any
// int64 caps nothing. One that is not a number (another string, an
// object, a boolean, a number past float64) is ignored: the token lives
// what was asked for.
func TestNuapayExpiryTimeAnyJSONNumber(t *testing.T) {
	now := time.Now()
	in10s := now.Add(10 * time.Second).UnixMilli()
	tests := []struct {
		expiryTime string
		want       time.Duration
	}{
		{jsonInt(in10s) + ".25", 10 * time.Second},
		{strconv.FormatFloat(float64(in10s), 'e', -1, 64), 10 * time.Second},
		{"1e300", time.Hour},
		{"-1e300", -time.Duration(now.UnixNano())},
		{`"` + jsonInt(in10s) + `"`, 10 * time.Second},
		{`"32503680000000"`, time.Hour},
		{`"soon"`, time.Hour},
		{`""`, time.Hour},
		{`{"ms":` + jsonInt(in10s) + `}`, time.Hour},
		{`true`, time.Hour},
		{`1e400`, time.Hour},
	}
	for _, tt := range tests {
		t.Run(tt.expiryTime, func(t *testing.T) {
			body := []byte(strings.Replace(okEnvelope, "%d", tt.expiryTime, 1))
			tok, err := ParseToken(http.StatusCreated, body, now, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if d := tok.Expiry.Sub(now); d < tt.want-time.Second || d > tt.want+time.Second {
				t.Fatalf("expiry in %s, want %s", d, tt.want)
			}
		})
	}
}

// The token answer's informational fields, in another JSON type than
// Gatekeeper's (a numeric id, scopes as one space-separated string or
// an object), do not fail the token: the id and scopes are read from
// them where they can be, else ignored. An id that is neither a string
// nor a number is no id: the token is then not revocable (ErrNoTokenID).
func TestNuapayTokenFieldsOfAnotherType(t *testing.T) {
	tests := []struct {
		data       string
		wantID     string
		wantScopes []string
	}{
		{`"id":12345,"scopes":["openbanking_pisp"]`, "12345", []string{"openbanking_pisp"}},
		{`"id":"t1","scopes":"openbanking_aisp openbanking_pisp"`, "t1", []string{"openbanking_aisp", "openbanking_pisp"}},
		{`"id":"t1","scopes":{"pisp":true},"tokenType":null`, "t1", nil},
		{`"id":null,"scopes":[1,"openbanking_pisp"]`, "", nil},
		{`"id":{"value":"t1"},"scopes":["s"]`, "", []string{"s"}},
		{`"id":["t1"],"scopes":["s"]`, "", []string{"s"}},
		{`"id":true,"scopes":["s"]`, "", []string{"s"}},
	}
	for _, tt := range tests {
		t.Run(tt.data, func(t *testing.T) {
			body := []byte(`{"data":{"accessToken":"eyJ.a.b",` + tt.data + `}}`)
			tok, err := ParseToken(http.StatusCreated, body, time.Now(), time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if tok.ID != tt.wantID || strings.Join(tok.Scopes, " ") != strings.Join(tt.wantScopes, " ") || tok.Value.Reveal() != "eyJ.a.b" {
				t.Fatalf("token id %q scopes %q, want %q %q", tok.ID, tok.Scopes, tt.wantID, tt.wantScopes)
			}
		})
	}
}

func TestNuapayOrganisationIDCannotChangeThePath(t *testing.T) {
	tests := []struct {
		org      string
		wantPath string // "" means refused before sending
	}{
		{"org-acme", "/gk/organisations/org-acme/tokens"},
		{"org.acme", "/gk/organisations/org.acme/tokens"},
		{"a..b", "/gk/organisations/a..b/tokens"},
		{"a/b", "/gk/organisations/a%2Fb/tokens"},
		{"../../admin", "/gk/organisations/%2E%2E%2F%2E%2E%2Fadmin/tokens"},
		{`..\admin`, "/gk/organisations/%2E%2E%5Cadmin/tokens"},
		{"...", "/gk/organisations/%2E%2E%2E/tokens"},
		{"50%off", "/gk/organisations/50%25off/tokens"},
		{"x?y#z", "/gk/organisations/x%3Fy%23z/tokens"},
		{"..", ""},
		{".", ""},
		{"", ""},
	}
	for _, tt := range tests {
		t.Run(tt.org, func(t *testing.T) {
			g := &gatekeeper{status: 201, body: strings.Replace(okEnvelope, "%d", "32503680000000", 1)}
			n := newNuapayTest(t, g)
			_, err := n.Token(context.Background(), broker.Request{Merchant: "m", Organisation: tt.org, Scopes: []string{"s"}})
			if tt.wantPath == "" {
				var re *broker.RequestError
				if !errors.As(err, &re) || g.gotPath != "" {
					t.Fatalf("err = %v, path = %q: want refusal before sending", err, g.gotPath)
				}
				return
			}
			if err != nil || g.gotPath != tt.wantPath {
				t.Fatalf("path = %q (err %v), want %q", g.gotPath, err, tt.wantPath)
			}
		})
	}
}

func TestNuapayErrors(t *testing.T) {
	tests := []struct {
		name       string
		status     int
		body       string
		header     http.Header
		wantCode   string
		wantDesc   string
		wantRetry  time.Duration
		wantTemp   bool
		wantDetail string
		wantClass  broker.Class
		// wantUnknown: the error says the organisation is unknown
		// (broker.ErrUnknownOrganisation).
		wantUnknown bool
	}{
		{name: "401 envelope", status: 401, body: `{"returnCode":"40100","returnDescription":"Unauthorized","details":null}`,
			wantCode: "40100", wantDesc: "Unauthorized", wantClass: broker.ClassCredential},
		{name: "422 details array", status: 422, body: `{"returnCode":"42200","returnDescription":"Invalid request","details":[{"code":"8888","description":"must be >= 10","field":"expiresIn","resourceUri":null}]}`,
			wantCode: "42200", wantDetail: "expiresIn"},
		{name: "400 details object", status: 400, body: `{"returnCode":"40000","returnDescription":"Invalid request","details":{"code":"1","description":"bad","field":"scopes"}}`,
			wantCode: "40000", wantDetail: "scopes"},
		{name: "404 unknown organisation", status: 404, body: `{"returnCode":"40400","returnDescription":"organisation not found","details":[{"field":"encodedOrganisationId"}]}`,
			wantCode: "40400", wantDesc: "organisation not found", wantDetail: "encodedOrganisationId", wantUnknown: true},
		{name: "numeric codes", status: 422, body: `{"returnCode":42200,"returnDescription":"Invalid request","details":{"code":8888,"description":"must be >= 10","field":"expiresIn"}}`,
			wantCode: "42200", wantDesc: "Invalid request", wantDetail: "expiresIn"},
		{name: "404 numeric code", status: 404, body: `{"returnCode":40400,"returnDescription":"organisation not found"}`,
			wantCode: "40400", wantDesc: "organisation not found", wantUnknown: true},
		{name: "nulls everywhere", status: 403, body: `{"returnCode":null,"returnDescription":null,"details":null}`, wantDesc: "Forbidden"},
		{name: "429 retry-after", status: 429, body: `{"returnCode":"42900"}`, header: http.Header{"Retry-After": {"7"}},
			wantCode: "42900", wantRetry: 7 * time.Second, wantTemp: true, wantClass: broker.ClassRateLimited},
		{name: "503 html", status: 503, body: `<html>down</html>`, wantDesc: "Service Unavailable", wantTemp: true, wantClass: broker.ClassTemporary},
		{name: "201 without token", status: 201, body: `{"data":{}}`, wantCode: "malformed_response"},
		{name: "201 truncated json", status: 201, body: `{"data":{"accessTok`, wantCode: "malformed_response"},
		{name: "201 html", status: 201, body: `<html>`, wantCode: "malformed_response"},
		{name: "201 mac token", status: 201, body: `{"data":{"accessToken":"x","tokenType":"MAC"}}`, wantCode: "unsupported_token_type"},
		{name: "201 revoked", status: 201, body: `{"data":{"accessToken":"x","tokenType":"BEARER","status":"REVOKED"}}`, wantCode: "inactive_token"},
		{name: "echoes the key", status: 401, body: `{"returnCode":"40100","returnDescription":"bad key partner-key (cGFydG5lci1rZXk6)","details":[{"field":"partner-key"}]}`,
			wantCode: "40100", wantDesc: "bad key [REDACTED] ([REDACTED])", wantDetail: "[REDACTED]", wantClass: broker.ClassCredential},
		{name: "echoes the key escaped in an object", status: 401, body: `{"returnCode":"40100","returnDescription":{"echo":"\u0070artner-key"},"details":[{"field":["\u0070artner-key"]}]}`,
			wantCode: "40100", wantDesc: "Unauthorized", wantClass: broker.ClassCredential},
		{name: "200 error envelope", status: 200, body: `{"returnCode":"40100","returnDescription":"bad key partner-key","details":null}`,
			wantCode: "40100", wantDesc: "bad key [REDACTED]"},
		{name: "201 error envelope with a numeric code", status: 201, body: `{"returnCode":40100,"returnDescription":"bad key"}`,
			wantCode: "40100", wantDesc: "bad key"},
		{name: "202 without data", status: 202, body: `{"uri":"/x"}`, wantCode: "malformed_response"},
		{name: "200 html", status: 200, body: `<html>maintenance</html>`, wantCode: "malformed_response"},
		{name: "429 body cut short", status: 429, body: `{"returnCode":"42900"`, header: http.Header{"Retry-After": {"7"}, "Content-Length": {"100"}},
			wantDesc: "Too Many Requests", wantRetry: 7 * time.Second, wantTemp: true, wantClass: broker.ClassRateLimited},
		{name: "429 body over the cap", status: 429, body: strings.Repeat("x", httpclient.MaxResponseBytes+1), header: http.Header{"Retry-After": {"7"}},
			wantCode: "response_too_large", wantRetry: 7 * time.Second, wantTemp: true, wantClass: broker.ClassRateLimited},
		{name: "body over the cap", status: 201, body: `{"data":"` + strings.Repeat("x", httpclient.MaxResponseBytes) + `"}`, wantCode: "response_too_large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newNuapayTest(t, &gatekeeper{status: tt.status, body: tt.body, header: tt.header})
			_, err := n.Token(context.Background(), broker.Request{Merchant: "acme", Organisation: "o", Scopes: []string{"s"}})
			var ae *broker.APIError
			if !errors.As(err, &ae) {
				t.Fatalf("err = %v (%T), want *broker.APIError", err, err)
			}
			if ae.StatusCode != tt.status || ae.Code != tt.wantCode || ae.RetryAfter != tt.wantRetry || broker.IsTemporary(err) != tt.wantTemp {
				t.Fatalf("got %+v temporary=%v", ae, broker.IsTemporary(err))
			}
			if c := n.Classify(err); c != tt.wantClass {
				t.Fatalf("class %d, want %d", c, tt.wantClass)
			}
			if tl := (*httpclient.TooLargeError)(nil); errors.As(err, &tl) != (tt.wantCode == broker.CodeTooLarge) {
				t.Fatalf("%v: a *httpclient.TooLargeError in the chain: %v, want %v", err, tl != nil, tt.wantCode == broker.CodeTooLarge)
			}
			if errors.Is(err, broker.ErrUnknownOrganisation) != tt.wantUnknown {
				t.Fatalf("%v: unknown organisation %v, want %v", err, !tt.wantUnknown, tt.wantUnknown)
			}
			if tt.wantDesc != "" && ae.Description != tt.wantDesc {
				t.Fatalf("description = %q, want %q", ae.Description, tt.wantDesc)
			}
			if tt.wantDetail != "" && (len(ae.Details) != 1 || ae.Details[0].Field != tt.wantDetail) {
				t.Fatalf("details = %+v", ae.Details)
			}
			if strings.Contains(err.Error(), "artner-key") { // plain or JSON-escaped
				t.Fatalf("error leaks the API key: %v", err)
			}
		})
	}
}

func TestNuapayTimeoutAndRefused(t *testing.T) {
	block := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-block }))
	defer srv.Close()
	defer close(block)
	n, _ := New(Config{BaseURL: srv.URL, APIKey: "k"})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := n.Token(ctx, broker.Request{Merchant: "m", Organisation: "o", Scopes: []string{"s"}})
	if !broker.IsTimeout(err) || !broker.IsTemporary(err) {
		t.Fatalf("err = %v: want a temporary timeout", err)
	}

	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close()
	n, _ = New(Config{BaseURL: dead.URL, APIKey: "k"})
	_, err = n.Token(context.Background(), broker.Request{Merchant: "m", Organisation: "o", Scopes: []string{"s"}})
	if err == nil || broker.IsTimeout(err) || !broker.IsTemporary(err) {
		t.Fatalf("err = %v: want a temporary non-timeout error", err)
	}
}

func TestNuapayRevokeAndOrganisations(t *testing.T) {
	var paths []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		paths = append(paths, r.Method+" "+r.URL.RequestURI())
		switch {
		case strings.HasSuffix(r.URL.Path, "/revoke"):
			io.WriteString(w, `{"data":{"id":"t1","status":"REVOKED"}}`)
		case r.URL.Query().Get("pagenumber") == "1":
			io.WriteString(w, `{"data":[{"id":"o1","name":"One"}],"page":{"pageNumber":1,"totalPages":2}}`)
		default:
			io.WriteString(w, `{"data":[{"id":"o2","name":"Two"}],"page":{"pageNumber":2,"totalPages":2}}`)
		}
	}))
	defer srv.Close()
	n, _ := New(Config{BaseURL: srv.URL, APIKey: "k", OrganisationsPath: "/cust/organisations"})
	ctx := context.Background()
	if err := n.RevokeToken(ctx, broker.Request{Organisation: "o1"}, broker.Token{ID: "t1"}); err != nil {
		t.Fatal(err)
	}
	var orgs []Organisation
	err := n.EachOrganisation(ctx, ListLimits{}, func(o Organisation) { orgs = append(orgs, o) })
	if err != nil || len(orgs) != 2 || orgs[1].ID != "o2" {
		t.Fatalf("orgs = %+v, %v", orgs, err)
	}
	want := []string{"POST /organisations/o1/tokens/t1/revoke",
		"GET /cust/organisations?pagenumber=1&pagesize=100", "GET /cust/organisations?pagenumber=2&pagesize=100"}
	if strings.Join(paths, "\n") != strings.Join(want, "\n") {
		t.Fatalf("calls:\n%s\nwant:\n%s", strings.Join(paths, "\n"), strings.Join(want, "\n"))
	}
}

// TestRevokeTokenNeverRevokesTheOrganisation: RevokeToken revokes one token
// by its id; a token without an id is left alone (ErrNoTokenID, no call),
// never by revoking every token of the organisation, other instances'
// included.
func TestRevokeTokenNeverRevokesTheOrganisation(t *testing.T) {
	for _, tc := range []struct {
		name    string
		id      string
		want    []string
		wantErr error
	}{
		{"with an id", "t1", []string{"POST /organisations/o1/tokens/t1/revoke"}, nil},
		{"with a dotted id", "t.1", []string{"POST /organisations/o1/tokens/t.1/revoke"}, nil},
		{"with a dot-segment id", "..", []string{"POST /organisations/o1/tokens/%2E%2E/revoke"}, nil},
		{"without an id", "", nil, ErrNoTokenID},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var paths []string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				paths = append(paths, r.Method+" "+r.URL.RequestURI())
				mu.Unlock()
				io.WriteString(w, `{"uri":"x","data":{"uri":"x","revokedTokensCount":3}}`)
			}))
			defer srv.Close()
			n, err := New(Config{BaseURL: srv.URL, APIKey: "partner-key"})
			if err != nil {
				t.Fatal(err)
			}
			err = n.RevokeToken(context.Background(), broker.Request{Merchant: "acme", Organisation: "o1"}, broker.Token{Value: "tok", ID: tc.id})
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("RevokeToken = %v, want %v", err, tc.wantErr)
			}
			mu.Lock()
			defer mu.Unlock()
			if strings.Join(paths, "\n") != strings.Join(tc.want, "\n") {
				t.Fatalf("calls %q, want %q", paths, tc.want)
			}
		})
	}
}

// A revocation refused before sending (an organisation id that could
// change the path) names the merchant it was for.
func TestRevokeTokenRefusalNamesTheMerchant(t *testing.T) {
	n, err := New(Config{BaseURL: "https://gatekeeper.example", APIKey: "partner-key"})
	if err != nil {
		t.Fatal(err)
	}
	err = n.RevokeToken(context.Background(), broker.Request{Merchant: "acme", Organisation: ".."}, broker.Token{Value: "tok", ID: "t1"})
	var re *broker.RequestError
	if !errors.As(err, &re) || re.Merchant != "acme" || !strings.Contains(err.Error(), `"acme"`) {
		t.Fatalf("RevokeToken = %v, want a refusal naming merchant acme", err)
	}
}

// A token answer refused for its tokenType or status never quotes the
// access token, nor more than a bounded text of what it got.
func TestNuapayRefusedTokenNeverQuoted(t *testing.T) {
	const token = "eyJhbGciOiJQUzI1NiJ9.secret-token.sig"
	long := strings.Repeat("x", 100_000)
	tests := []struct {
		name     string
		data     string
		wantCode string
	}{
		{"token type quoting the token", `"tokenType":"MAC ` + token + `"`, "unsupported_token_type"},
		{"status quoting the token", `"tokenType":"BEARER","status":"SUSPENDED ` + token + `"`, "inactive_token"},
		{"huge token type", `"tokenType":"` + long + `"`, "unsupported_token_type"},
		{"huge status", `"status":"` + long + `"`, "inactive_token"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := `{"data":{"accessToken":"` + token + `",` + tt.data + `}}`
			n := newNuapayTest(t, &gatekeeper{status: 201, body: body})
			_, err := n.Token(context.Background(), broker.Request{Merchant: "acme", Organisation: "o", Scopes: []string{"s"}})
			var ae *broker.APIError
			if !errors.As(err, &ae) || ae.Code != tt.wantCode {
				t.Fatalf("err = %v, want an *broker.APIError %s", err, tt.wantCode)
			}
			if msg := err.Error(); strings.Contains(msg, "secret-token") || len(msg) > 1000 {
				t.Fatalf("error quotes the token or is %d bytes long: %.200s", len(msg), msg)
			}
		})
	}
}

// An error answer with a flood of details gives an error of bounded size
// that says how many details were left out.
func TestNuapayErrorDetailsBounded(t *testing.T) {
	var b strings.Builder
	b.WriteString(`{"returnCode":"42200","returnDescription":"Invalid request","details":[`)
	for i := range 20_000 {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(`{"code":"8888","description":"bad value","field":"scopes"}`)
	}
	b.WriteString(`]}`)
	ae := ParseError(422, nil, []byte(b.String()), time.Now())
	if msg := ae.Error(); len(msg) > 4000 || !strings.Contains(msg, " [19990 more details left out]") {
		t.Fatalf("error is %d bytes, want a bounded one saying how many details were left out: %.300s", len(msg), msg)
	}
}

// A 404 without Nuapay's error envelope (a proxy's or a web server's page:
// the base URL does not lead to Gatekeeper) is not taken for an unknown
// organisation: its error says to check base_url, not the merchant's
// organisation.
func TestNuapayNotFoundWithoutEnvelopeIsNotAnUnknownOrganisation(t *testing.T) {
	tests := []struct {
		name        string
		body        string
		wantUnknown bool
	}{
		{"envelope", `{"returnCode":"40400","returnDescription":"Organisation not found"}`, true},
		{"envelope with details only", `{"returnCode":null,"details":[{"field":"encodedOrganisationId"}]}`, true},
		{"envelope with the status text only", `{"returnCode":null,"returnDescription":"Not Found"}`, true},
		{"html page", `<html><body>404 Not Found</body></html>`, false},
		{"empty body", ``, false},
		{"another framework's json", `{"timestamp":"2026-12-07T10:00:00Z","status":404,"error":"Not Found","path":"/organisations/o/tokens"}`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newNuapayTest(t, &gatekeeper{status: 404, body: tt.body})
			_, err := n.Token(context.Background(), broker.Request{Merchant: "acme", Organisation: "o", Scopes: []string{"s"}})
			if got := errors.Is(err, broker.ErrUnknownOrganisation); got != tt.wantUnknown {
				t.Fatalf("%v: unknown organisation %v, want %v", err, got, tt.wantUnknown)
			}
			if !tt.wantUnknown && !strings.Contains(err.Error(), "base_url") {
				t.Fatalf("%v: want an error that says to check base_url", err)
			}
		})
	}
}

// A Gatekeeper that refuses the page size of 100 (the older organisations
// API documents 20) is asked again with 20, and the whole list is read.
func TestNuapayOrganisationsSmallerPages(t *testing.T) {
	var mu sync.Mutex
	var queries []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		queries = append(queries, r.URL.RawQuery)
		mu.Unlock()
		size, _ := strconv.Atoi(r.URL.Query().Get("pagesize"))
		if size > 20 {
			w.WriteHeader(http.StatusBadRequest)
			io.WriteString(w, `{"returnCode":"40000","returnDescription":"Invalid request","details":[{"code":"8888","description":"must be <= 20","field":"pagesize"}]}`)
			return
		}
		page, _ := strconv.Atoi(r.URL.Query().Get("pagenumber"))
		fmt.Fprintf(w, `{"data":[{"id":"o%d"}],"page":{"pageNumber":%d,"pageSize":20,"totalPages":2}}`, page, page)
	}))
	defer srv.Close()
	n, err := New(Config{BaseURL: srv.URL, APIKey: "partner-key"})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	if err := n.EachOrganisation(context.Background(), ListLimits{}, func(o Organisation) { ids = append(ids, o.ID) }); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []string{"pagenumber=1&pagesize=100", "pagenumber=1&pagesize=20", "pagenumber=2&pagesize=20"}
	if strings.Join(ids, ",") != "o1,o2" || strings.Join(queries, " ") != strings.Join(want, " ") {
		t.Fatalf("organisations %q after %q, want o1,o2 after %q", ids, queries, want)
	}
}

// A lifetime that is not a whole number of seconds is asked for in whole
// seconds (expiresIn), and a token answer without expiryTime lives what
// was asked for, not the fraction more.
func TestNuapayLifetimeInWholeSeconds(t *testing.T) {
	g := &gatekeeper{status: 201, body: `{"data":{"id":"t1","accessToken":"eyJ.a.b","tokenType":"BEARER","status":"ACTIVE"}}`}
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	sent := time.Unix(1_700_000_000, 0)
	n, err := New(Config{BaseURL: srv.URL, APIKey: "partner-key", Now: func() time.Time { return sent }})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := n.Token(context.Background(), broker.Request{Merchant: "acme", Organisation: "o", Scopes: []string{"s"}, Lifetime: 10*time.Second + 900*time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if g.gotBody["expiresIn"] != float64(10) {
		t.Fatalf("expiresIn %v, want 10", g.gotBody["expiresIn"])
	}
	if d := tok.Expiry.Sub(sent); d != 10*time.Second {
		t.Fatalf("expiry in %s, want 10s (what was asked for)", d)
	}
}

// TestNuapayUnusableTokenNamesItsStatus: a token Gatekeeper issued with
// its documented 201 but that the broker cannot use is reported with that
// status, not another.
func TestNuapayUnusableTokenNamesItsStatus(t *testing.T) {
	g := &gatekeeper{status: http.StatusCreated, body: strings.Replace(okEnvelope, "%d", "1000", 1)}
	n := newNuapayTest(t, g)
	br := broker.New(broker.Options{Sleep: func(context.Context, time.Duration) error { return nil }})
	t.Cleanup(br.Close)
	b := broker.NewBindingFor(broker.NewProfile("nuapay#1", n, []string{"openbanking_pisp"}, "", time.Hour), "acme", "org-acme")
	_, err := br.Check(context.Background(), b)
	var ae *broker.APIError
	if !errors.As(err, &ae) || ae.Code != "expired_token" || ae.StatusCode != http.StatusCreated {
		t.Fatalf("Check = %v, want an expired_token answered 201", err)
	}
}

// A white-labelled base URL with a path prefix, with or without a
// trailing slash, and escaped as the partner wrote it, leads every call to
// the same prefix: the token request, the revocation and the
// organisations list.
func TestNuapayBasePathPrefix(t *testing.T) {
	for _, tc := range []struct {
		base, prefix string
	}{
		{"", ""},
		{"/", ""},
		{"/gk", "/gk"},
		{"/gk/", "/gk"},
		{"/gk//", "/gk"},
		{"/partner/nuapay", "/partner/nuapay"},
		{"/partner%2Fnuapay", "/partner%2Fnuapay"},
	} {
		t.Run(tc.base, func(t *testing.T) {
			var mu sync.Mutex
			var calls []string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				calls = append(calls, r.Method+" "+r.RequestURI)
				mu.Unlock()
				switch {
				case r.Method == http.MethodGet:
					io.WriteString(w, `{"data":[{"id":"o1"}],"page":{"pageNumber":1,"pageSize":100,"totalElements":1,"totalPages":1}}`)
				case strings.HasSuffix(r.URL.Path, "/revoke"):
					io.WriteString(w, `{"data":{"id":"t1","status":"REVOKED"}}`)
				default:
					w.WriteHeader(http.StatusCreated)
					io.WriteString(w, strings.Replace(okEnvelope, "%d", "32503680000000", 1))
				}
			}))
			defer srv.Close()
			for _, orgsPath := range []string{"", "/cust/organisations"} {
				mu.Lock()
				calls = nil
				mu.Unlock()
				n, err := New(Config{BaseURL: srv.URL + tc.base, APIKey: "partner-key", OrganisationsPath: orgsPath})
				if err != nil {
					t.Fatal(err)
				}
				ctx := context.Background()
				req := broker.Request{Merchant: "acme", Organisation: "o1", Scopes: []string{"openbanking_pisp"}}
				if _, err := n.Token(ctx, req); err != nil {
					t.Fatal(err)
				}
				if err := n.RevokeToken(ctx, req, broker.Token{ID: "t1"}); err != nil {
					t.Fatal(err)
				}
				if err := n.EachOrganisation(ctx, ListLimits{}, func(Organisation) {}); err != nil {
					t.Fatal(err)
				}
				list := "/organisations"
				if orgsPath != "" {
					list = orgsPath
				}
				want := []string{"POST " + tc.prefix + "/organisations/o1/tokens", "POST " + tc.prefix + "/organisations/o1/tokens/t1/revoke",
					"GET " + tc.prefix + list + "?pagenumber=1&pagesize=100"}
				mu.Lock()
				got := strings.Join(calls, "\n")
				mu.Unlock()
				if got != strings.Join(want, "\n") {
					t.Fatalf("organisations_path %q: calls\n%s\nwant\n%s", orgsPath, got, strings.Join(want, "\n"))
				}
			}
		})
	}
}

// The organisations list is read page by page from a Gatekeeper that
// pages as its document says (pagenumber from 1, page.totalPages), with
// the page size it serves (its maximum, or the size asked for), and the
// reading stops at the last page without asking for one more.
func TestNuapayOrganisationsPaging(t *testing.T) {
	for _, tc := range []struct {
		name      string
		orgs      int
		maxSize   int // the largest page the server serves: a larger pagesize is cut to it
		wantCalls int
	}{
		{"empty list", 0, 100, 1},
		{"one page", 57, 100, 1},
		{"exactly one full page", 100, 100, 1},
		{"three pages of 20", 57, 20, 3},
		{"two full pages of 20", 40, 20, 2},
		{"many pages", 2501, 100, 26},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			calls := 0
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				calls++
				mu.Unlock()
				num, _ := strconv.Atoi(r.URL.Query().Get("pagenumber"))
				size, _ := strconv.Atoi(r.URL.Query().Get("pagesize"))
				size = min(size, tc.maxSize)
				var data []Organisation
				for i := (num - 1) * size; i < min(num*size, tc.orgs); i++ {
					data = append(data, Organisation{ID: fmt.Sprintf("org-%d", i), Name: "Org", Code: "C", Status: "ACTIVE"})
				}
				body, _ := json.Marshal(map[string]any{"uri": r.URL.RequestURI(), "data": data,
					"page": map[string]int{"pageNumber": num, "pageSize": size, "totalElements": tc.orgs, "totalPages": (tc.orgs + size - 1) / size}})
				w.Write(body)
			}))
			defer srv.Close()
			n, err := New(Config{BaseURL: srv.URL, APIKey: "partner-key"})
			if err != nil {
				t.Fatal(err)
			}
			seen := map[string]bool{}
			if err := n.EachOrganisation(context.Background(), ListLimits{}, func(o Organisation) { seen[o.ID] = true }); err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			defer mu.Unlock()
			if len(seen) != tc.orgs || calls != tc.wantCalls {
				t.Fatalf("%d organisations in %d calls, want %d in %d", len(seen), calls, tc.orgs, tc.wantCalls)
			}
		})
	}
}

// ListLimits.Pages is the most pages a reading within the limits asks
// for: every organisation at the smallest page size Gatekeeper serves,
// the first page asked again at that size, and an empty last page; at
// most MaxListPages.
func TestListLimitsPages(t *testing.T) {
	for _, tc := range []struct {
		orgs, want int
	}{
		{1, 2},
		{19, 2},
		{20, 3},
		{1000, 52},
		{0, DefaultMaxOrganisations/legacyPageSize + 2},
		{1_000_000, MaxListPages},
	} {
		if got := (ListLimits{Organisations: tc.orgs}).Pages(); got != tc.want {
			t.Errorf("Pages of %d organisations = %d, want %d", tc.orgs, got, tc.want)
		}
	}
}

// A revocation answered 2xx counts only when the answer does not say
// otherwise: Nuapay's error envelope, or a token whose status is not
// REVOKED, is a revocation that did not happen, named so.
func TestRevokeTokenReadsTheAnswer(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		wantErr    string // "" for revoked
	}{
		{"revoked", `{"uri":"x","data":{"id":"t1","status":"REVOKED"}}`, ""},
		{"revoked in lower case", `{"data":{"id":"t1","status":"revoked"}}`, ""},
		{"without a status", `{"data":{"uri":"x","revokedTokensCount":1}}`, ""},
		{"empty body", ``, ""},
		{"still active", `{"data":{"id":"t1","status":"ACTIVE"}}`, `token status is "ACTIVE"`},
		{"error envelope", `{"returnCode":"40400","returnDescription":"token not found","details":null}`, "token not found"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, tc.body) }))
			defer srv.Close()
			n, err := New(Config{BaseURL: srv.URL, APIKey: "partner-key"})
			if err != nil {
				t.Fatal(err)
			}
			err = n.RevokeToken(context.Background(), broker.Request{Merchant: "acme", Organisation: "o1"}, broker.Token{Value: "tok", ID: "t1"})
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("RevokeToken = %v, want %q", err, tc.wantErr)
			}
		})
	}
}
