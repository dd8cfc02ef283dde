package dpopas

import (
	"html"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"regexp"
	"strings"
	"testing"
)

const (
	// maxInteractions bounds the pages Approve submits (sign-in and
	// consent take two).
	maxInteractions = 5
	// maxPageSize bounds a page Approve reads.
	maxPageSize = 1 << 20
)

// The interaction pages' form: where it posts and its prompt (login or
// consent).
var (
	formAction = regexp.MustCompile(`<form[^>]*action="([^"]+)"`)
	formPrompt = regexp.MustCompile(`name="prompt" value="([a-z]+)"`)
)

// Approve plays the user at the authorization server: it opens authURL (the
// authorization endpoint's URL, or a URL that redirects to it such as a
// consent link), signs in as Subject, grants the consent, and stops at the
// first redirect out of the server (to the client's redirect URI), whose
// code and state it returns. An error answer (error=...) fails the test.
// It sends with client's Transport and Timeout (nil: http.DefaultClient's)
// and keeps its own cookies and redirect rule.
func (s *Server) Approve(t testing.TB, client *http.Client, authURL string) (code, state string) {
	t.Helper()
	callback := s.approve(t, client, authURL)
	q := callback.Query()
	if e := q.Get("error"); e != "" {
		t.Fatalf("dpopas: the authorization server answered %s: %s", e, q.Get("error_description"))
	}
	if q.Get("code") == "" {
		t.Fatalf("dpopas: the redirect to %s carries no code", callback.Redacted())
	}
	return q.Get("code"), q.Get("state")
}

// approve drives the interaction and returns the URL the server redirects
// out to.
func (s *Server) approve(t testing.TB, client *http.Client, authURL string) *url.URL {
	t.Helper()
	issuer, err := url.Parse(s.Issuer)
	if err != nil {
		t.Fatal(err)
	}
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	if client == nil {
		client = http.DefaultClient
	}
	var out *url.URL
	c := &http.Client{
		Transport: client.Transport,
		Timeout:   client.Timeout,
		Jar:       jar,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if via[len(via)-1].URL.Host == issuer.Host && req.URL.Host != issuer.Host {
				out = req.URL
				return http.ErrUseLastResponse
			}
			return nil
		},
	}

	resp, err := c.Get(authURL)
	for i := 0; ; i++ {
		if err != nil {
			t.Fatalf("dpopas: approving %s: %v", authURL, err)
		}
		page, rerr := io.ReadAll(io.LimitReader(resp.Body, maxPageSize))
		resp.Body.Close()
		if rerr != nil {
			t.Fatalf("dpopas: reading %s: %v", resp.Request.URL.Redacted(), rerr)
		}
		if out != nil {
			return out
		}
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("dpopas: %s answered %s: %s", resp.Request.URL.Redacted(), resp.Status, page)
		}
		if i == maxInteractions {
			t.Fatalf("dpopas: still no redirect out of the authorization server after %d pages; last %s:\n%s", i, resp.Request.URL.Redacted(), page)
		}
		action, prompt := formAction.FindSubmatch(page), formPrompt.FindSubmatch(page)
		if action == nil || prompt == nil {
			t.Fatalf("dpopas: %s is no sign-in or consent page:\n%s", resp.Request.URL.Redacted(), page)
		}
		submit, perr := resp.Request.URL.Parse(html.UnescapeString(string(action[1])))
		if perr != nil {
			t.Fatalf("dpopas: the form's action %q: %v", action[1], perr)
		}
		form := url.Values{"prompt": {string(prompt[1])}}
		if string(prompt[1]) == "login" {
			form.Set("login", Subject)
			form.Set("password", "any")
		}
		resp, err = c.Post(submit.String(), "application/x-www-form-urlencoded", strings.NewReader(form.Encode()))
	}
}
