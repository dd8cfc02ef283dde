package sandbox

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// restartedBank is a new sandbox (same clients as newBank) on the state
// file at path, as `sandbox -state DIR` after a restart; an empty path
// keeps its state in memory.
func restartedBank(t *testing.T, path string) (*Server, *httptest.Server) {
	t.Helper()
	s, srv, _ := newBank(t, "")
	if path != "" {
		if err := s.PersistState(path); err != nil {
			t.Fatalf("PersistState: %v", err)
		}
	}
	return s, srv
}

func refreshAt(t *testing.T, srv *httptest.Server, rt string) resp {
	t.Helper()
	return do(t, srv, "POST", "/oauth2/token", basicHdr("sec", "s3cret"),
		"grant_type=refresh_token&refresh_token="+url.QueryEscape(rt))
}

// TestPersistStateAcrossRestarts: a sandbox restarted on the same state file
// accepts the refresh tokens it issued before, and remembers that a rotated
// or revoked one is gone; without a state file a restart forgets them all.
func TestPersistStateAcrossRestarts(t *testing.T) {
	for _, tc := range []struct {
		name    string
		persist bool
		// before runs on the first sandbox with the refresh token it
		// issued, and returns the refresh tokens that must work after the
		// restart and those that must not.
		before func(t *testing.T, srv *httptest.Server, rt string) (valid, invalid []string)
	}{
		{"issued", true, func(t *testing.T, srv *httptest.Server, rt string) ([]string, []string) {
			return []string{rt}, nil
		}},
		{"rotated", true, func(t *testing.T, srv *httptest.Server, rt string) ([]string, []string) {
			r := refreshAt(t, srv, rt)
			next, _ := r.body["refresh_token"].(string)
			if r.status != 200 || next == "" {
				t.Fatalf("refresh before the restart: %d %s", r.status, r.raw)
			}
			return []string{next}, []string{rt}
		}},
		{"revoked", true, func(t *testing.T, srv *httptest.Server, rt string) ([]string, []string) {
			req, _ := http.NewRequest("POST", srv.URL+"/oauth2/revoke", strings.NewReader("token="+url.QueryEscape(rt)))
			for k, v := range basicHdr("sec", "s3cret") {
				req.Header.Set(k, v)
			}
			res, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			res.Body.Close()
			if res.StatusCode != 200 {
				t.Fatalf("revoke: %d", res.StatusCode)
			}
			return nil, []string{rt}
		}},
		{"in memory only", false, func(t *testing.T, srv *httptest.Server, rt string) ([]string, []string) {
			return nil, []string{rt}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := ""
			if tc.persist {
				path = filepath.Join(t.TempDir(), "bank-state.json")
			}
			first, srv := restartedBank(t, path)
			rt := first.IssueRefreshToken("sec", []string{"accounts"})
			valid, invalid := tc.before(t, srv, rt)
			srv.Close()

			second, srv2 := restartedBank(t, path)
			for _, tok := range invalid {
				if r := refreshAt(t, srv2, tok); r.status != 400 || r.body["error"] != "invalid_grant" {
					t.Errorf("after the restart, a refresh token that should be gone: %d %s, want 400 invalid_grant", r.status, r.raw)
				}
			}
			for _, tok := range valid {
				r := refreshAt(t, srv2, tok)
				if r.status != 200 || r.body["scope"] != "accounts" {
					t.Fatalf("after the restart, the refresh token issued before: %d %s, want 200", r.status, r.raw)
				}
				// The access token comes from the restarted sandbox and is
				// valid there; the rotation is saved too.
				if _, _, ok := second.Issued(r.body["access_token"].(string)); !ok {
					t.Error("the access token from the restarted sandbox is not valid there")
				}
				third, _ := restartedBank(t, path)
				if third.RefreshTokenValid(tok) || !third.RefreshTokenValid(r.body["refresh_token"].(string)) {
					t.Error("the rotation after the restart was not saved")
				}
			}
			if !tc.persist {
				return
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("state file mode %v, want 0600", fi.Mode().Perm())
			}
			entries, _ := os.ReadDir(filepath.Dir(path))
			if len(entries) != 1 {
				t.Errorf("the state folder holds %d files, want only the state file (no temporary files left)", len(entries))
			}
		})
	}
}

// TestPersistStateRefusesBadFiles: a state file the sandbox cannot read is
// an error that names the file and says what to do, not an empty bank.
func TestPersistStateRefusesBadFiles(t *testing.T) {
	for _, tc := range []struct {
		name, content, want string
	}{
		{"not JSON", "{", "unexpected EOF"},
		{"other version", `{"version": 2, "refresh_tokens": []}`, "version 2, want 1"},
		{"unknown field", `{"version": 1, "tokens": []}`, `unknown field "tokens"`},
		{"grant without client", `{"version": 1, "refresh_tokens": [{"token": "rt-1"}]}`, "refresh_tokens[0] has no token or no client"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bank-state.json")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			s, _, _ := newBank(t, "")
			err := s.PersistState(path)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), path) ||
				!strings.Contains(err.Error(), "delete the file") {
				t.Fatalf("PersistState = %v, want an error naming %s with %q and what to do", err, path, tc.want)
			}
		})
	}
}
