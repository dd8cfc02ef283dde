package module

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// codeStatus is the status each error code is answered with (classify,
// merchantOf, outbound checks and the caller policy).
var codeStatus = map[string]string{
	"method_refused": "405", "forbidden_trailer": "400", "missing_merchant": "400", "ambiguous_merchant": "400",
	"invalid_merchant": "400", "unknown_merchant": "403", "caller_unauthenticated": "401",
	"caller_keys_unavailable": "503", "caller_forbidden": "403", "token_unavailable": "502", "token_timeout": "504",
	"token_refused": "502", "consent_required": "502", "client_gone": "499", "token_api_down": "503",
	"token_rate_limited": "503", "token_bad_response": "502",
	"unlisted_organisation": "403", "organisations_unavailable": "503", "too_many_merchants": "503",
	"host_not_allowed": "421", "cross_site_request": "403",
}

// TestREADMEFailureTable: every error code the handler answers with has a
// row in the README's failure table, with its status.
func TestREADMEFailureTable(t *testing.T) {
	for code := range messages {
		if _, ok := codeStatus[code]; !ok {
			t.Errorf("code %q: add its status to codeStatus and a row to the README failure table", code)
		}
	}
	b, err := os.ReadFile(filepath.Join("..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "\n## Failure behaviour\n")
	if !ok {
		t.Fatal("README.md has no section \"## Failure behaviour\"")
	}
	section, _, _ = strings.Cut(section, "\n## ")
	var rows []string
	for _, line := range strings.Split(section, "\n") {
		if strings.HasPrefix(line, "|") {
			rows = append(rows, line)
		}
	}
	for code, status := range codeStatus {
		i := slices.IndexFunc(rows, func(r string) bool { return strings.Contains(r, "`"+code+"`") })
		if i < 0 {
			t.Errorf("README failure table: no row for `%s`", code)
			continue
		}
		cells := strings.Split(rows[i], "|") // "", what, retried, status, code, ""
		if len(cells) < 5 || !strings.Contains(cells[3], status) {
			t.Errorf("README failure table: the row of `%s` does not give status %s: %s", code, status, rows[i])
		}
	}
}
