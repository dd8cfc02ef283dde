package sandbox

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

const key = "partner-key"

var basic = "Basic " + base64.StdEncoding.EncodeToString([]byte(key+":"))

// clock is a settable clock for Config.Now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time          { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Advance(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// serve starts s on a free port of 127.0.0.1, closed when the test ends.
func serve(t *testing.T, s *Server) *httptest.Server {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &httptest.Server{Listener: ln, Config: &http.Server{Handler: s}}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

func newSandbox(t *testing.T) (*Server, *httptest.Server, *clock) {
	t.Helper()
	clk := &clock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	s := New(Config{
		APIKeys: []string{key, "other-key"},
		Organisations: []Organisation{{"org-acme", "Acme", "ACME"}, {"org-globex", "Globex", "GLOBEX"},
			{"a/b%c", "Slashy", "SL"}, {"org-initech", "Initech", "INI"}, {"org-umbrella", "Umbrella", "UMB"}},
		OneIDClients: map[string]string{"cid": "csecret", "we ird": "s&c=t"},
		Now:          clk.Now,
	})
	return s, serve(t, s), clk
}

type resp struct {
	status int
	header http.Header
	raw    string
	body   map[string]any
}

// do sends a request; path is used verbatim (already escaped).
func do(t *testing.T, srv *httptest.Server, method, path string, hdr map[string]string, body string) resp {
	t.Helper()
	req, err := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	r := resp{status: res.StatusCode, header: res.Header, raw: string(b)}
	if err := json.Unmarshal(b, &r.body); err != nil {
		t.Fatalf("%s %s: body %q is not a JSON object: %v", method, path, b, err)
	}
	return r
}

func jsonHdr(auth string) map[string]string {
	return map[string]string{"Authorization": auth, "Content-Type": "application/json"}
}

// requestToken issues a Nuapay token and returns its data object.
func requestToken(t *testing.T, srv *httptest.Server, org, body string) map[string]any {
	t.Helper()
	r := do(t, srv, "POST", "/organisations/"+url.PathEscape(org)+"/tokens", jsonHdr(basic), body)
	if r.status != 201 {
		t.Fatalf("token for %q: %d %s", org, r.status, r.raw)
	}
	return r.body["data"].(map[string]any)
}

func TestNuapayTokenStatuses(t *testing.T) {
	_, srv, _ := newSandbox(t)
	emptyPass := "Basic " + base64.StdEncoding.EncodeToString([]byte(key+":x"))
	wrongKey := "Basic " + base64.StdEncoding.EncodeToString([]byte("nope:"))
	ok := `{"scopes":["openbanking_pisp"],"expiresIn":3600}`
	for _, tc := range []struct {
		name, method, path string
		hdr                map[string]string
		body               string
		want               int
		field              string
	}{
		{"created", "POST", "/organisations/org-acme/tokens", jsonHdr(basic), ok, 201, ""},
		{"json with charset", "POST", "/organisations/org-acme/tokens", map[string]string{"Authorization": basic, "Content-Type": "application/json; charset=utf-8"}, ok, 201, ""},
		{"min expiresIn", "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":["a"],"expiresIn":10}`, 201, ""},
		{"max expiresIn", "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":["a"],"expiresIn":31556926}`, 201, ""},
		{"escaped org", "POST", "/organisations/a%2Fb%25c/tokens", jsonHdr(basic), ok, 201, ""},
		{"no auth", "POST", "/organisations/org-acme/tokens", map[string]string{"Content-Type": "application/json"}, ok, 401, ""},
		{"wrong key", "POST", "/organisations/org-acme/tokens", jsonHdr(wrongKey), ok, 401, ""},
		{"non-empty password", "POST", "/organisations/org-acme/tokens", jsonHdr(emptyPass), ok, 401, ""},
		{"bearer not basic", "POST", "/organisations/org-acme/tokens", jsonHdr("Bearer " + key), ok, 401, ""},
		{"not json", "POST", "/organisations/org-acme/tokens", map[string]string{"Authorization": basic, "Content-Type": "text/plain"}, ok, 415, ""},
		{"no content type", "POST", "/organisations/org-acme/tokens", map[string]string{"Authorization": basic}, ok, 415, ""},
		{"malformed json", "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":[`, 400, ""},
		{"trailing garbage", "POST", "/organisations/org-acme/tokens", jsonHdr(basic), ok + "x", 400, ""},
		{"wrong type", "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":["a"],"expiresIn":"60"}`, 400, "expiresIn"},
		{"missing scopes", "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"expiresIn":60}`, 422, "scopes"},
		{"empty scopes", "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":[]}`, 422, "scopes"},
		{"empty scope", "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":[""]}`, 422, "scopes"},
		{"expiresIn too small", "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":["a"],"expiresIn":9}`, 422, "expiresIn"},
		{"expiresIn too big", "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":["a"],"expiresIn":31556927}`, 422, "expiresIn"},
		{"unknown org", "POST", "/organisations/org-nope/tokens", jsonHdr(basic), ok, 404, "encodedOrganisationId"},
		{"unescaped slash org", "POST", "/organisations/a/b%25c/tokens", jsonHdr(basic), ok, 200, ""}, // not a token route: echo
		{"dot dot", "POST", "/organisations/../tokens", jsonHdr(basic), ok, 404, "encodedOrganisationId"},
		{"escaped dot dot", "POST", "/organisations/%2E%2E/tokens", jsonHdr(basic), ok, 404, "encodedOrganisationId"},
		{"get", "GET", "/organisations/org-acme/tokens", jsonHdr(basic), "", 405, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := do(t, srv, tc.method, tc.path, tc.hdr, tc.body)
			if r.status != tc.want {
				t.Fatalf("status %d, want %d: %s", r.status, tc.want, r.raw)
			}
			if tc.want < 400 {
				return
			}
			if r.body["returnCode"] != fmt.Sprint(tc.want*100) || r.body["returnDescription"] == "" {
				t.Errorf("error envelope %s", r.raw)
			}
			details, _ := r.body["details"].([]any)
			if len(details) == 0 {
				t.Fatalf("no details: %s", r.raw)
			}
			if f := details[0].(map[string]any)["field"]; tc.field != "" && f != tc.field {
				t.Errorf("field %v, want %q", f, tc.field)
			}
			if tc.want == 401 && r.header.Get("WWW-Authenticate") == "" {
				t.Error("401 without WWW-Authenticate")
			}
		})
	}
}

func TestNuapayEnvelopeAndExpiry(t *testing.T) {
	s, srv, clk := newSandbox(t)
	before := s.TokenRequests()
	r := do(t, srv, "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":["openbanking_pisp","openbanking_aisp"]}`)
	if r.status != 201 || r.header.Get("Cache-Control") != "no-store" {
		t.Fatalf("%d %v %s", r.status, r.header, r.raw)
	}
	d := r.body["data"].(map[string]any)
	id, tok := d["id"].(string), d["accessToken"].(string)
	now := clk.Now().UnixMilli()
	for k, want := range map[string]any{"tokenType": "BEARER", "status": "ACTIVE", "revokedTimestamp": nil,
		"expiryTime": float64(now + 10_000), "createdTimestamp": float64(now), "requestedOrganisation": "org-acme",
		"ipFiltering": true, "mtlsFilter": false, "uri": r.body["uri"]} {
		if got, ok := d[k]; !ok || got != want {
			t.Errorf("data.%s = %v, want %v", k, got, want)
		}
	}
	if d["requestingOrganisation"] == "" || fmt.Sprint(d["scopes"]) != "[openbanking_pisp openbanking_aisp]" {
		t.Errorf("data %v", d)
	}
	link := d["links"].([]any)[0].(map[string]any)
	if link["resourceType"] != "revoketoken" || link["uri"] != "/organisations/org-acme/tokens/"+id+"/revoke" {
		t.Errorf("link %v", link)
	}
	if strings.Count(tok, ".") != 2 || strings.ContainsFunc(tok, func(c rune) bool { return c <= ' ' || c > '~' }) {
		t.Errorf("token %q is not a printable JWT", tok)
	}
	if got := s.TokenRequests() - before; got != 1 {
		t.Errorf("TokenRequests grew by %d", got)
	}
	if org, scopes, valid := s.Issued(tok); org != "org-acme" || len(scopes) != 2 || !valid {
		t.Errorf("Issued = %q %v %v", org, scopes, valid)
	}
	clk.Advance(9999 * time.Millisecond)
	if _, _, valid := s.Issued(tok); !valid {
		t.Error("invalid before expiry")
	}
	clk.Advance(time.Millisecond)
	if org, _, valid := s.Issued(tok); valid || org != "org-acme" {
		t.Errorf("after expiry: %q valid=%v", org, valid)
	}
	if org, scopes, valid := s.Issued("nope"); org != "" || scopes != nil || valid {
		t.Error("unknown token reported as issued")
	}
}

func TestRevoke(t *testing.T) {
	s, srv, _ := newSandbox(t)
	body := `{"scopes":["admin"],"expiresIn":3600}`
	a1, a2 := requestToken(t, srv, "org-acme", body), requestToken(t, srv, "org-acme", body)
	g := requestToken(t, srv, "org-globex", body)
	id1 := a1["id"].(string)

	for _, tc := range []struct {
		name, path, auth string
		want             int
	}{
		{"no auth", "/organisations/org-acme/tokens/" + id1 + "/revoke", "", 401},
		{"other org", "/organisations/org-globex/tokens/" + id1 + "/revoke", basic, 404},
		{"unknown token", "/organisations/org-acme/tokens/nope/revoke", basic, 404},
		{"unknown org", "/organisations/org-nope/tokens/revoke", basic, 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if r := do(t, srv, "POST", tc.path, map[string]string{"Authorization": tc.auth}, ""); r.status != tc.want {
				t.Fatalf("status %d, want %d: %s", r.status, tc.want, r.raw)
			}
		})
	}
	if r := do(t, srv, "GET", "/organisations/org-acme/tokens/revoke", map[string]string{"Authorization": basic}, ""); r.status != 405 {
		t.Errorf("GET revoke: %d", r.status)
	}

	r := do(t, srv, "POST", "/organisations/org-acme/tokens/"+id1+"/revoke", map[string]string{"Authorization": basic}, "")
	d := r.body["data"].(map[string]any)
	if r.status != 200 || d["status"] != "REVOKED" || d["revokedTimestamp"] == nil || d["id"] != id1 {
		t.Fatalf("revoke one: %d %s", r.status, r.raw)
	}
	if _, _, valid := s.Issued(a1["accessToken"].(string)); valid {
		t.Error("revoked token still valid")
	}
	if _, _, valid := s.Issued(a2["accessToken"].(string)); !valid {
		t.Error("other token revoked")
	}

	r = do(t, srv, "POST", "/organisations/org-acme/tokens/revoke", map[string]string{"Authorization": basic}, "")
	if r.status != 200 || r.body["data"].(map[string]any)["revokedTokensCount"] != float64(1) || r.body["uri"] == "" {
		t.Fatalf("revoke all: %d %s", r.status, r.raw)
	}
	if _, _, valid := s.Issued(a2["accessToken"].(string)); valid {
		t.Error("revoke all left a token valid")
	}
	if _, _, valid := s.Issued(g["accessToken"].(string)); !valid {
		t.Error("revoke all touched another organisation")
	}
}

func TestListOrganisations(t *testing.T) {
	_, srv, _ := newSandbox(t)
	auth := map[string]string{"Authorization": basic}
	for _, tc := range []struct {
		path      string
		hdr       map[string]string
		want      int
		ids       string
		pageTotal float64
	}{
		{"/organisations", auth, 200, "[org-acme org-globex a/b%c org-initech org-umbrella]", 1},
		{"/organisations?pagenumber=1&pagesize=2", auth, 200, "[org-acme org-globex]", 3},
		{"/cust/organisations?pagenumber=3&pagesize=2", auth, 200, "[org-umbrella]", 3},
		{"/cust/organisations?pagenumber=4&pagesize=2", auth, 200, "[]", 3},
		{"/cust/organisations?pagesize=100&name=GLOB", auth, 200, "[org-globex]", 1},
		{"/organisations?pagesize=0", auth, 400, "", 0},
		{"/organisations?pagesize=101", auth, 400, "", 0},
		{"/organisations?pagenumber=x", auth, 400, "", 0},
		{"/organisations", nil, 401, "", 0},
	} {
		t.Run(tc.path, func(t *testing.T) {
			r := do(t, srv, "GET", tc.path, tc.hdr, "")
			if r.status != tc.want {
				t.Fatalf("status %d, want %d: %s", r.status, tc.want, r.raw)
			}
			if tc.want != 200 {
				return
			}
			var ids []string
			for _, o := range r.body["data"].([]any) {
				ids = append(ids, o.(map[string]any)["id"].(string))
			}
			page := r.body["page"].(map[string]any)
			if fmt.Sprint(ids) != tc.ids || page["totalPages"] != tc.pageTotal || r.body["uri"] != tc.path {
				t.Errorf("ids %v page %v uri %v", ids, page, r.body["uri"])
			}
		})
	}
	if r := do(t, srv, "POST", "/organisations", jsonHdr(basic), "{}"); r.status != 405 {
		t.Errorf("POST /organisations: %d", r.status)
	}
}

func TestOneID(t *testing.T) {
	s, srv, clk := newSandbox(t)
	form := map[string]string{"Content-Type": "application/x-www-form-urlencoded"}
	basicFor := func(id, secret string) map[string]string {
		return map[string]string{"Content-Type": "application/x-www-form-urlencoded", "Authorization": "Basic " +
			base64.StdEncoding.EncodeToString([]byte(url.QueryEscape(id)+":"+url.QueryEscape(secret)))}
	}
	for _, tc := range []struct {
		name string
		hdr  map[string]string
		body string
		want int
		err  string
	}{
		{"form", form, "grant_type=client_credentials&client_id=cid&client_secret=csecret", 200, ""},
		{"basic", basicFor("we ird", "s&c=t"), "grant_type=client_credentials", 200, ""},
		{"bad secret", form, "grant_type=client_credentials&client_id=cid&client_secret=x", 401, "invalid_client"},
		{"unknown client", form, "grant_type=client_credentials&client_id=x&client_secret=csecret", 401, "invalid_client"},
		{"no credentials", form, "grant_type=client_credentials", 401, "invalid_client"},
		{"bad basic", basicFor("cid", "x"), "grant_type=client_credentials", 401, "invalid_client"},
		{"password grant", form, "grant_type=password&client_id=cid&client_secret=csecret", 400, "unsupported_grant_type"},
		{"no grant", form, "client_id=cid&client_secret=csecret", 400, "invalid_request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := do(t, srv, "POST", "/v1/token", tc.hdr, tc.body)
			if r.status != tc.want || (tc.err != "" && r.body["error"] != tc.err) {
				t.Fatalf("%d %s, want %d %s", r.status, r.raw, tc.want, tc.err)
			}
			if tc.want != 200 {
				return
			}
			if r.body["token_type"] != "bearer" || r.body["expires_in"] != float64(86400) {
				t.Errorf("body %s", r.raw)
			}
			tok := r.body["access_token"].(string)
			parts := strings.Split(tok, ".")
			var claims map[string]any
			b, err := base64.RawURLEncoding.DecodeString(parts[min(1, len(parts)-1)])
			if len(parts) != 3 || err != nil || json.Unmarshal(b, &claims) != nil {
				t.Fatalf("not a JWT: %q", tok)
			}
			now := clk.Now().Unix()
			if claims["iat"] != float64(now) || claims["exp"] != float64(now+86400) || claims["sub"] == "" {
				t.Errorf("claims %v", claims)
			}
			if org, _, valid := s.Issued(tok); !valid || org != claims["sub"] {
				t.Errorf("Issued = %q %v", org, valid)
			}
		})
	}
	if n := s.OneIDTokenRequests(); n != 8 {
		t.Errorf("OneIDTokenRequests = %d", n)
	}
	if r := do(t, srv, "GET", "/v1/token", nil, ""); r.status != 405 {
		t.Errorf("GET /v1/token: %d", r.status)
	}
}

func TestFail(t *testing.T) {
	s, srv, _ := newSandbox(t)
	s.Fail(429, "7", 2)
	r := do(t, srv, "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":["a"]}`)
	if r.status != 429 || r.header.Get("Retry-After") != "7" || r.body["returnCode"] != "42900" {
		t.Fatalf("nuapay: %d %v %s", r.status, r.header, r.raw)
	}
	r = do(t, srv, "POST", "/v1/token", map[string]string{"Content-Type": "application/x-www-form-urlencoded"},
		"grant_type=client_credentials&client_id=cid&client_secret=csecret")
	if r.status != 429 || r.header.Get("Retry-After") != "7" || r.body["error"] == nil {
		t.Fatalf("oneid: %d %s", r.status, r.raw)
	}
	s.Fail(503, "", 1)
	r = do(t, srv, "POST", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":["a"]}`)
	if r.status != 503 || r.header.Get("Retry-After") != "" {
		t.Fatalf("503: %d %s", r.status, r.raw)
	}
	requestToken(t, srv, "org-acme", `{"scopes":["a"]}`)
	if s.TokenRequests() != 3 || s.OneIDTokenRequests() != 1 {
		t.Errorf("counters %d %d", s.TokenRequests(), s.OneIDTokenRequests())
	}
}

func TestEcho(t *testing.T) {
	s, srv, clk := newSandbox(t)
	tok := requestToken(t, srv, "org-acme", `{"scopes":["openbanking_pisp"],"expiresIn":60}`)["accessToken"].(string)
	for _, tc := range []struct {
		name        string
		auth        string
		require     bool
		advance     time.Duration
		want        int
		issued, ok  bool
		fingerprint bool
	}{
		{"valid", "Bearer " + tok, false, 0, 200, true, true, true},
		{"lower-case scheme", "bearer " + tok, true, 0, 200, true, true, true},
		{"no token", "", false, 0, 200, false, false, false},
		{"foreign token", "Bearer abc", false, 0, 200, false, false, true},
		{"required and missing", "", true, 0, 401, false, false, false},
		{"required and foreign", "Bearer abc", true, 0, 401, false, false, true},
		{"expired", "Bearer " + tok, true, time.Minute, 401, true, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk.Advance(tc.advance)
			hdr := map[string]string{"X-Fapi-Interaction-Id": "f-1", "Idempotency-Key": "k-1"}
			if tc.auth != "" {
				hdr["Authorization"] = tc.auth
			}
			if tc.require {
				hdr["X-Sandbox-Require-Token"] = "1"
			}
			r := do(t, srv, "POST", "/tpp/payments/a%2Fb?x=1&y=2", hdr, "hello")
			if r.status != tc.want {
				t.Fatalf("status %d, want %d: %s", r.status, tc.want, r.raw)
			}
			if strings.Contains(r.raw, tok) || strings.Contains(r.raw, "abc") {
				t.Fatalf("echo leaks the token: %s", r.raw)
			}
			if tc.want == 401 && r.header.Get("WWW-Authenticate") != `Bearer error="invalid_token"` {
				t.Errorf("WWW-Authenticate %q", r.header.Get("WWW-Authenticate"))
			}
			var e Echo
			if err := json.Unmarshal([]byte(r.raw), &e); err != nil {
				t.Fatal(err)
			}
			a := e.Authorization
			if e.Method != "POST" || e.Path != "/tpp/payments/a/b" || e.EscapedPath != "/tpp/payments/a%2Fb" ||
				e.Query != "x=1&y=2" || e.BodyBytes != 5 || e.Headers["Idempotency-Key"] != "k-1" ||
				e.Headers["X-Fapi-Interaction-Id"] != "f-1" || e.Headers["Authorization"] != "" || !strings.HasPrefix(e.Host, "127.0.0.1:") {
				t.Errorf("echo %+v", e)
			}
			if a.Present != (tc.auth != "") || a.IssuedBySandbox != tc.issued || a.Valid != tc.ok ||
				(a.Fingerprint != "") != tc.fingerprint || (tc.fingerprint && len(a.Fingerprint) != 8) {
				t.Errorf("authorization %+v", a)
			}
			if tc.issued && (a.Organisation != "org-acme" || fmt.Sprint(a.Scopes) != "[openbanking_pisp]") {
				t.Errorf("authorization %+v", a)
			}
		})
	}
	r := do(t, srv, "GET", "/v1/organisations", nil, "")
	if r.status != 200 || r.body["path"] != "/v1/organisations" {
		t.Errorf("oneid echo: %d %s", r.status, r.raw)
	}
	_ = s
}

func TestConcurrent(t *testing.T) {
	s, srv, _ := newSandbox(t)
	post := func(path, ctype, body string) (*http.Response, error) {
		req, _ := http.NewRequest("POST", srv.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", basic)
		req.Header.Set("Content-Type", ctype)
		return srv.Client().Do(req)
	}
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			org := []string{"org-acme", "org-globex"}[i%2]
			res, err := post("/organisations/"+org+"/tokens", "application/json", `{"scopes":["a"],"expiresIn":60}`)
			if err != nil {
				t.Error(err)
				return
			}
			var env struct{ Data struct{ AccessToken string } }
			json.NewDecoder(res.Body).Decode(&env)
			res.Body.Close()
			req, _ := http.NewRequest("GET", srv.URL+"/tpp/x", nil)
			req.Header.Set("Authorization", "Bearer "+env.Data.AccessToken)
			if res, err := srv.Client().Do(req); err == nil {
				res.Body.Close()
			}
			if i%5 == 0 {
				if res, err := post("/organisations/"+org+"/tokens/revoke", "", ""); err == nil {
					res.Body.Close()
				}
			}
			if o, _, _ := s.Issued(env.Data.AccessToken); o != org {
				t.Errorf("Issued org %q, want %q", o, org)
			}
		})
	}
	wg.Wait()
	if s.TokenRequests() != 20 {
		t.Errorf("TokenRequests = %d", s.TokenRequests())
	}
}
