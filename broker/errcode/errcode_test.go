package errcode

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// providerTypes are the provider types a message can be asked for: none
// (refused before a provider) and the registry's types.
var providerTypes = []string{"", "nuapay", "oauth2"}

// TestTableComplete: every code has a unique snake_case name, an error
// status and a message for every provider type; only 503 answers carry
// Retry-After.
func TestTableComplete(t *testing.T) {
	seen := map[string]Code{}
	name := regexp.MustCompile(`^[a-z]+(_[a-z]+)+$`)
	for c := Code(1); c < count; c++ {
		if !name.MatchString(c.String()) {
			t.Errorf("code %d: name %q, want snake_case", c, c.String())
		}
		if prev, dup := seen[c.String()]; dup {
			t.Errorf("codes %d and %d share the name %q", prev, c, c.String())
		}
		seen[c.String()] = c
		if s := c.Status(); s < 400 || s > 599 {
			t.Errorf("%s: status %d, want 4xx or 5xx", c, s)
		}
		for _, typ := range providerTypes {
			if c.Message(typ) == "" {
				t.Errorf("%s, provider type %q: no message", c, typ)
			}
		}
		if rules[c].retryAfter && c.Status() != http.StatusServiceUnavailable {
			t.Errorf("%s: Retry-After on a %d answer, want it on 503 only", c, c.Status())
		}
	}
	if Code(0).String() != "" || Code(0).Status() != 0 {
		t.Errorf("the zero Code is %q %d, want no code", Code(0), Code(0).Status())
	}
}

// TestClassify: each token failure gets its code; the codes Classify
// returns are the metric's FetchCodes.
func TestClassify(t *testing.T) {
	invalidGrant := &broker.APIError{Provider: "oauth2", StatusCode: 400, Code: "invalid_grant"}
	for _, tt := range []struct {
		err  error
		want Code
	}{
		{context.Canceled, ClientGone},
		{fmt.Errorf("waiting: %w", context.Canceled), ClientGone},
		{context.DeadlineExceeded, TokenTimeout},
		{&oauth.ConsentRequiredError{Provider: "bank", Merchant: "acme", Err: oauth.ErrNoRefreshToken}, ConsentRequired},
		{&oauth.ConsentRequiredError{Provider: "bank", Merchant: "acme", Err: invalidGrant}, ConsentRequired},
		{&broker.UnavailableError{SourceID: "x"}, TokenAPIDown},
		{&broker.UnavailableError{SourceID: "x", Err: context.DeadlineExceeded}, TokenAPIDown},
		{&broker.RequestError{Merchant: "acme", Field: "scopes", Reason: "empty"}, TokenRefused},
		{&broker.APIError{Provider: "oauth2", StatusCode: 429}, TokenRateLimited},
		{&broker.APIError{Provider: "oauth2", StatusCode: 200}, TokenBadResponse},
		{&broker.APIError{Provider: "nuapay", StatusCode: 201, Err: errors.New("no token")}, TokenBadResponse},
		{&broker.APIError{Provider: "oauth2", StatusCode: 401, Code: "invalid_client"}, TokenRefused},
		{&broker.APIError{Provider: "nuapay", StatusCode: 404}, TokenRefused},
		{&broker.APIError{Provider: "nuapay", StatusCode: 503}, TokenUnavailable},
		{&broker.APIError{Provider: "nuapay", StatusCode: 408}, TokenUnavailable},
		{&budget.ExhaustedError{Provider: "bank", RetryAfter: time.Second}, BudgetExhausted},
		{fmt.Errorf("merchant %q: %w", "acme", &budget.ExhaustedError{Provider: "bank"}), BudgetExhausted},
		{errors.New("connection refused"), TokenUnavailable},
	} {
		if got := Classify(tt.err); got != tt.want {
			t.Errorf("Classify(%v) = %s, want %s", tt.err, got, tt.want)
		}
	}
	want := []Code{ClientGone, ConsentRequired, TokenAPIDown, TokenTimeout, TokenRateLimited, TokenBadResponse, TokenRefused, BudgetExhausted, TokenUnavailable}
	if got := FetchCodes(); !slices.Equal(got, want) {
		t.Errorf("FetchCodes() = %v, want %v", got, want)
	}
}

// TestMessages: the refusals a caller cannot mend by itself (an unknown
// merchant, a provider refusing the partner's credentials) say who must
// act, on what, that the log has the precise cause, and that retrying
// does not help; OAuth users are not told about Nuapay's organisations.
// An exhausted budget says nothing of calls it did not refuse.
func TestMessages(t *testing.T) {
	for _, tt := range []struct {
		code Code
		typ  string
		want []string
		not  string
	}{
		{UnknownMerchant, "", []string{"check the merchant id the request sends", "operator must add the merchant to the registry", "reload", "retrying will not help"}, ""},
		{TokenRefused, "", []string{"log has", "operator must check", "credentials", "retrying will not help"}, ""},
		{TokenRefused, "nuapay", []string{"log has Nuapay's answer", "operator must check the partner API key", "organisation", "retrying will not help"}, ""},
		{TokenRefused, "oauth2", []string{"log has", "operator must check the client id and credentials", "retrying will not help"}, "organisation"},
		{InvalidMerchant, "", []string{"no comma"}, ""},
		{InvalidMerchant, "oauth2", []string{"no comma"}, ""},
		// The refused request can be the second of a token request the
		// provider asked to be sent again: one went out.
		{BudgetExhausted, "", []string{"rate limit", "retry after the Retry-After delay"}, "not called"},
	} {
		m := tt.code.Message(tt.typ)
		for _, w := range tt.want {
			if !strings.Contains(m, w) {
				t.Errorf("%s (%q): %q does not say %q", tt.code, tt.typ, m, w)
			}
		}
		if tt.not != "" && strings.Contains(strings.ToLower(m), tt.not) {
			t.Errorf("%s (%q): %q speaks of %q", tt.code, tt.typ, m, tt.not)
		}
	}
}

// TestRetryAfter: only the codes that tell the caller to retry later pass
// on the wait their cause carries.
func TestRetryAfter(t *testing.T) {
	limited := &broker.APIError{Provider: "oauth2", StatusCode: 429, RetryAfter: 3 * time.Second}
	for _, tt := range []struct {
		code  Code
		cause error
		want  time.Duration
	}{
		{TokenRateLimited, limited, 3 * time.Second},
		{TokenAPIDown, &broker.UnavailableError{SourceID: "x", RetryAfter: 10 * time.Second, Err: limited}, 10 * time.Second},
		{TokenUnavailable, &broker.APIError{Provider: "oauth2", StatusCode: 503, RetryAfter: 3 * time.Second}, 0},
		{TokenRateLimited, nil, 0},
		{TooManyMerchants, limited, 0},
	} {
		if got := tt.code.RetryAfter(tt.cause); got != tt.want {
			t.Errorf("%s.RetryAfter(%v) = %s, want %s", tt.code, tt.cause, got, tt.want)
		}
	}
}

// TestREADMEFailureTable: every code has a row in the README's failure
// table giving its status, and Retry-After where the answer carries it.
func TestREADMEFailureTable(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "\n## Failure behaviour\n")
	if !ok {
		t.Fatal("README.md has no section \"## Failure behaviour\"")
	}
	section, _, _ = strings.Cut(section, "\n## ")
	codeRe, statusRe := regexp.MustCompile("`([a-z_]+)`"), regexp.MustCompile(`^\s*(\d{3})((?:\s*/\s*\d{3})*)`)
	documented := map[string]bool{}
	for _, row := range strings.Split(section, "\n") {
		cells := strings.Split(row, "|") // "", what, retried, caller gets, error, ""
		if len(cells) != 6 || strings.TrimSpace(cells[4]) == "–" {
			continue
		}
		m := statusRe.FindStringSubmatch(cells[3])
		if m == nil {
			continue // the header and its rule
		}
		statuses := []string{m[1]}
		for _, s := range strings.Split(m[2], "/")[1:] {
			statuses = append(statuses, strings.TrimSpace(s))
		}
		for i, cm := range codeRe.FindAllStringSubmatch(cells[4], -1) {
			c := byName(cm[1])
			if c == 0 {
				t.Errorf("README failure table names %q, which is not an error code", cm[1])
				continue
			}
			documented[cm[1]] = true
			status := statuses[0]
			if len(statuses) > 1 && i < len(statuses) {
				status = statuses[i]
			}
			if status != strconv.Itoa(c.Status()) {
				t.Errorf("README failure table: `%s` answers %s, the table says %d", c, status, c.Status())
			}
			if says := strings.Contains(cells[3], "Retry-After"); says != rules[c].retryAfter {
				t.Errorf("README failure table: `%s` with Retry-After %t, the table says %t", c, says, rules[c].retryAfter)
			}
		}
	}
	for c := Code(1); c < count; c++ {
		if !documented[c.String()] {
			t.Errorf("README failure table: no row for `%s`", c)
		}
	}
}

// byName returns the code named name, 0 for none.
func byName(name string) Code {
	for c := Code(1); c < count; c++ {
		if c.String() == name {
			return c
		}
	}
	return 0
}
