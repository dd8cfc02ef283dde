package admission

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
)

func TestHeaderMerchant(t *testing.T) {
	const name = "X-Merchant-Id"
	for _, tt := range []struct {
		name string
		hdr  http.Header
		want string
		code errcode.Code
	}{
		{"one", http.Header{name: {"acme"}}, "acme", 0},
		{"missing", http.Header{}, "", errcode.MissingMerchant},
		{"empty", http.Header{name: {""}}, "", errcode.MissingMerchant},
		{"malformed", http.Header{name: {"ac me"}}, "", errcode.InvalidMerchant},
		{"twice", http.Header{name: {"acme", "globex"}}, "", errcode.AmbiguousMerchant},
		{"underscore twin", http.Header{name: {"acme"}, "X-Merchant_id": {"globex"}}, "", errcode.AmbiguousMerchant},
		{"dot twin alone", http.Header{"X.Merchant.Id": {"globex"}}, "", errcode.AmbiguousMerchant},
		{"other header", http.Header{name: {"acme"}, "X_Request_Id": {"1"}}, "acme", 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, code := HeaderMerchant(tt.hdr, name)
			if got != tt.want || code != tt.code {
				t.Fatalf("HeaderMerchant = %q, %v; want %q, %v", got, code, tt.want, tt.code)
			}
		})
	}
}

func TestUnbound(t *testing.T) {
	other := errors.New("registry gone")
	for _, tt := range []struct {
		err   error
		code  errcode.Code
		cause error
	}{
		{bindings.ErrTooManyMerchants, errcode.TooManyMerchants, nil},
		{fmt.Errorf("m: %w", bindings.ErrUnknownMerchant), errcode.UnknownMerchant, nil},
		{&listingRefusal{code: errcode.OrganisationsUnavailable}, errcode.OrganisationsUnavailable, nil},
		{other, errcode.UnknownMerchant, other},
	} {
		rf := Unbound("acme", tt.err)
		if rf.Code != tt.code || rf.Merchant != "acme" || rf.Cause != tt.cause {
			t.Errorf("Unbound(%v) = %+v, want code %v cause %v", tt.err, rf, tt.code, tt.cause)
		}
	}
}

// TestOrganisationsUnavailableRetryAfter: the 503 organisations_unavailable
// of a wildcard merchant says, in Retry-After, when the organisations list
// is read again.
func TestOrganisationsUnavailableRetryAfter(t *testing.T) {
	for _, tt := range []struct {
		retryAfter time.Duration
		want       string
	}{
		{5 * time.Second, "5"},
		{1500 * time.Millisecond, "2"},
		{0, ""},
	} {
		rf := Unbound("acme", &listingRefusal{code: errcode.OrganisationsUnavailable, retryAfter: tt.retryAfter})
		rec := httptest.NewRecorder()
		rf.Prepare(rec.Header(), zap.NewNop(), nil)
		if got := rec.Header().Get("Retry-After"); rf.Code != errcode.OrganisationsUnavailable || got != tt.want {
			t.Errorf("next read in %s: %s with Retry-After %q, want %s with %q", tt.retryAfter, rf.Code, got, errcode.OrganisationsUnavailable, tt.want)
		}
	}
}

func TestRefusalAnswer(t *testing.T) {
	for _, tt := range []struct {
		name   string
		rf     Refusal
		header string // a header the answer must carry
	}{
		{"method", Refusal{Code: errcode.MethodRefused}, "Allow"},
		{"merchant", Refusal{Code: errcode.UnknownMerchant, Merchant: "acme"}, "Cache-Control"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			tt.rf.Prepare(rec.Header(), zap.NewNop(), nil)
			if err := tt.rf.Write(rec); err != nil {
				t.Fatal(err)
			}
			var body ErrorBody
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
				t.Fatal(err)
			}
			if rec.Code != tt.rf.Code.Status() || body.Error != tt.rf.Code.String() || body.Merchant != tt.rf.Merchant || body.Message == "" {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			if rec.Header().Get(tt.header) == "" || rec.Header().Get("Content-Type") != "application/json" {
				t.Fatalf("headers %v", rec.Header())
			}
		})
	}
}

// The refusals of one backoff of the failure policy log one line per
// RepeatInterval, the next one counting those left out; other causes and
// other holds are logged apart.
func TestRepeatedRefusalsLimited(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	open := func(source string) error {
		return &broker.UnavailableError{SourceID: source, RetryAfter: 30 * time.Second, Err: errors.New("503")}
	}
	type req struct {
		at    time.Duration
		cause error
	}
	type line struct {
		source     string // "" for a cause without a backoff
		suppressed int64
		since      time.Duration
	}
	other := errors.New("registry gone")
	for _, tt := range []struct {
		name  string
		reqs  []req
		lines []line
	}{
		{"one backoff", []req{{0, open("a")}, {time.Second, open("a")}, {2 * time.Second, open("a")}, {time.Minute, open("a")}},
			[]line{{"a", 0, 0}, {"a", 2, time.Second}}},
		{"holds apart", []req{{0, open("a")}, {0, open("b")}, {time.Second, open("a")}, {time.Second, open("b")}},
			[]line{{"a", 0, 0}, {"b", 0, 0}}},
		{"not a backoff: every line", []req{{0, other}, {0, other}}, []line{{"", 0, 0}, {"", 0, 0}}},
		{"quiet then again: no count", []req{{0, open("a")}, {time.Hour, open("a")}}, []line{{"a", 0, 0}, {"a", 0, 0}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			now := t0
			limit := NewRepeatLimiter(func() time.Time { return now })
			core, logs := observer.New(zap.InfoLevel)
			logger := zap.New(core)
			for _, r := range tt.reqs {
				now = t0.Add(r.at)
				rec := httptest.NewRecorder()
				Refusal{Code: errcode.Classify(r.cause), Merchant: "acme", Cause: r.cause}.Prepare(rec.Header(), logger, limit)
				if r.cause != other && rec.Header().Get("Retry-After") == "" {
					t.Fatal("a refusal left out of the log lost its Retry-After")
				}
			}
			got := logs.FilterMessage("no token for request").All()
			if len(got) != len(tt.lines) {
				t.Fatalf("%d lines, want %d: %v", len(got), len(tt.lines), got)
			}
			for i, want := range tt.lines {
				f := got[i].ContextMap()
				source, _ := f["source"].(string)
				n, _ := f["suppressed"].(int64)
				if source != want.source || n != want.suppressed || f["merchant"] != "acme" {
					t.Errorf("line %d: %v; want source %q, %d suppressed", i, f, want.source, want.suppressed)
				}
				if want.suppressed > 0 && !f["suppressed_since"].(time.Time).Equal(t0.Add(want.since)) {
					t.Errorf("line %d: suppressed_since %v, want %v", i, f["suppressed_since"], t0.Add(want.since))
				}
				if want.source != "" && f["backoff"] != "source" {
					t.Errorf("line %d: backoff %v, want source", i, f["backoff"])
				}
			}
		})
	}
}

// shorthands expands the Caddyfile's {header.NAME} shorthand as the
// Caddyfile adapter does: only when the name is letters, digits, '_' and
// '-' up to the closing brace.
func shorthands(s string) string {
	return regexp.MustCompile(`{header\.([\w-]*)}`).ReplaceAllString(s, "{http.request.header.$1}")
}

func TestParseSelector(t *testing.T) {
	for _, tt := range []struct {
		selector, header, err string
	}{
		{"{http.request.header.X-Merchant-Id}", "X-Merchant-Id", ""},
		{"{http.request.header.x-merchant-id}", "X-Merchant-Id", ""},
		{"{http.request.uri.query.merchant}", "", ""},
		{"{http.request.uri.query.a:b}", "", ""},
		{"m-{http.request.uri.query.a:b}", "", ""},
		{"{http.request.header.X-A}{http.request.header.X-B}", "", ""},
		{"{http.request.header.X-A}b", "", ""},
		{"m-{http.request.cookie.m}", "", ""},
		{"{header.X-Merchant-Id}", "", "write the full placeholder, {http.request.header.X-Merchant-Id}"}, // a JSON config's: never adapted
		{"{file.merchant}", "", ""},                                                                       // Caddy's global placeholder of a file's contents
		{"acme", "", ""},
		{"{http.request.header.X-Merchant-Id", "", "braces that do not pair"},
		{"{http.request.header.{X}}", "", "braces that do not pair"},
		{"acme}", "", "braces that do not pair"},
		{"{}", "", "empty placeholder"},
		{"a{}b", "", "empty placeholder"},
		{"{http.request.header.X-Merchant-Id:acme}", "", "no default at request time"},
		{"{http.request.header.X-Merchant-Id:acme}", "", "request_header @nomerchant X-Merchant-Id acme"},
		{"m-{http.request.header.X Merchant}", "", `"X Merchant" is not a header field name`},
		{"{http.request.header.}", "", `"" is not a header field name`},
		{"{http.request.header.X-Tenant:globex}", "", "`@nomerchant not header X-Tenant *` and `request_header @nomerchant X-Tenant globex`"},
		{"{header.X-Merchant-Id:acme}", "", "Caddyfile shorthand"},
		{"{header.X-Tenant:globex}", "", "write the full placeholder, {http.request.header.X-Tenant}; a Caddy placeholder has no default at request time: " +
			"to give requests without the header a default merchant, use `@nomerchant not header X-Tenant *` and `request_header @nomerchant X-Tenant globex`"},
		{"m-{header.X-Merchant-Id:acme}", "", "{header.X-Merchant-Id:acme} is a Caddyfile shorthand"},
	} {
		s, err := ParseSelector(tt.selector, shorthands)
		switch {
		case tt.err == "" && err != nil:
			t.Errorf("ParseSelector(%q): %v", tt.selector, err)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err) || !strings.Contains(err.Error(), tt.selector)):
			t.Errorf("ParseSelector(%q) error %v, want one naming the selector and %q", tt.selector, err, tt.err)
		case s.Header() != tt.header:
			t.Errorf("ParseSelector(%q).Header() = %q, want %q", tt.selector, s.Header(), tt.header)
		}
	}
}

// queryReplacer expands {http.request.uri.query.NAME} placeholders from a URL query, as
// caddy.Replacer does with an empty value for an absent or unknown one.
type queryReplacer url.Values

func (q queryReplacer) ReplaceAll(input, empty string) string {
	var out strings.Builder
	for {
		start := strings.IndexByte(input, '{')
		end := strings.IndexByte(input, '}')
		if start < 0 || end < start {
			return out.String() + input
		}
		out.WriteString(input[:start])
		v := url.Values(q).Get(strings.TrimPrefix(input[start+1:end], "http.request.uri.query."))
		if v == "" {
			v = empty
		}
		out.WriteString(v)
		input = input[end+1:]
	}
}

func TestSelectorMerchant(t *testing.T) {
	for _, tt := range []struct {
		name, selector string
		hdr            http.Header
		query          url.Values
		want           string
		code           errcode.Code
	}{
		{"header present", "{http.request.header.X-Merchant-Id}", http.Header{"X-Merchant-Id": {"globex"}}, nil, "globex", 0},
		{"header absent", "{http.request.header.X-Merchant-Id}", http.Header{}, nil, "", errcode.MissingMerchant},
		{"header malformed", "{http.request.header.X-Merchant-Id}", http.Header{"X-Merchant-Id": {"ac me"}}, nil, "", errcode.InvalidMerchant},
		{"header twice", "{http.request.header.X-Merchant-Id}", http.Header{"X-Merchant-Id": {"a", "b"}}, nil, "", errcode.AmbiguousMerchant},
		{"query present", "{http.request.uri.query.merchant}", nil, url.Values{"merchant": {"globex"}}, "globex", 0},
		{"query absent", "{http.request.uri.query.merchant}", nil, url.Values{}, "", errcode.MissingMerchant},
		{"query key with a colon", "{http.request.uri.query.a:b}", nil, url.Values{"a:b": {"globex"}, "a": {"acme"}}, "globex", 0},
		{"query key with a colon, absent", "{http.request.uri.query.a:b}", nil, url.Values{"a": {"acme"}}, "", errcode.MissingMerchant},
		{"text and placeholder", "m-{http.request.uri.query.merchant}", nil, url.Values{"merchant": {"1"}}, "m-1", 0},
		{"fixed", "acme", nil, nil, "acme", 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := ParseSelector(tt.selector, shorthands)
			if err != nil {
				t.Fatal(err)
			}
			got, code := s.Merchant(tt.hdr, queryReplacer(tt.query))
			if got != tt.want || code != tt.code {
				t.Fatalf("Merchant = %q, %v; want %q, %v", got, code, tt.want, tt.code)
			}
		})
	}
}

// TestSelectorMerchantAllocs: reading the merchant from a header, present
// or absent, allocates nothing.
func TestSelectorMerchantAllocs(t *testing.T) {
	s, err := ParseSelector("{http.request.header.X-Merchant-Id}", shorthands)
	if err != nil {
		t.Fatal(err)
	}
	for _, hdr := range []http.Header{{"X-Merchant-Id": {"globex"}}, {}} {
		if n := testing.AllocsPerRun(100, func() { s.Merchant(hdr, nil) }); n != 0 {
			t.Errorf("Merchant(%v) allocates %v times, want 0", hdr, n)
		}
	}
}
