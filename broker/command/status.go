package command

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
)

// StatusQuery is what `caddy token-broker status` asks for.
type StatusQuery struct {
	// Provider keeps one provider's merchants ("" for all).
	Provider string
	// State lists the merchants in this state instead of those needing
	// attention ("" for those).
	State string
	// JSON prints the report (one page) as JSON instead of tables.
	JSON bool
	// After chooses the page JSON prints: the merchants after this id
	// (the next of the previous page); "" for the first page. Used with
	// JSON only.
	After string
	// Limit is the most merchants the page JSON prints lists, 1 to
	// opstate.MaxLimit (the admin API refuses more); 0 for the admin
	// API's default, opstate.DefaultLimit. Used with JSON only.
	Limit int
}

// MaxListed is the most merchants `status` lists in its merchants table;
// it says how many more there are.
const MaxListed = 50

// Status prints the state of the token broker at admin address addr
// (GET /token_broker/state): its providers, the merchants needing
// attention (every state but fresh, refreshing and idle), or those in
// q.State, at most MaxListed, and the merchants counted by state; with
// q.JSON, the report as JSON. now is the wall clock, for relative times.
// It returns ErrFailed, with its message on Err, when the instance
// cannot be asked.
func Status(std IO, request AdminRequest, addr string, q StatusQuery, now time.Time) error {
	if q.State != "" && !slices.Contains(opstate.States(), q.State) {
		return fail(std.Err, "unknown state %q: one of %v", q.State, opstate.States())
	}
	if q.JSON {
		var raw json.RawMessage
		if err := askAdmin(request, addr, http.MethodGet, stateURI(q.Provider, q.State, q.After, q.Limit), nil, &raw); err != nil {
			return fail(std.Err, "%v", err)
		}
		var rep opstate.Report
		if err := json.Unmarshal(raw, &rep); err == nil && !hasProvider(std, addr, rep, q.Provider) {
			return ErrFailed
		}
		var out bytes.Buffer
		if err := json.Indent(&out, raw, "", "  "); err != nil {
			return fail(std.Err, "reading the state of admin address %s: %v", addr, err)
		}
		out.WriteByte('\n')
		_, err := out.WriteTo(std.Out)
		return err
	}
	var rep opstate.Report
	if err := askAdmin(request, addr, http.MethodGet, stateURI(q.Provider, "", "", 1), nil, &rep); err != nil {
		return fail(std.Err, "%v", err)
	}
	if !hasProvider(std, addr, rep, q.Provider) {
		return ErrFailed
	}
	states := attention()
	if q.State != "" {
		states = []string{q.State}
	}
	listed, more, err := merchantsIn(request, addr, q.Provider, states, rep.Counts)
	if err != nil {
		return fail(std.Err, "%v", err)
	}
	printProviders(std.Out, rep, now)
	fmt.Fprintln(std.Out)
	title := "MERCHANTS NEEDING ATTENTION"
	if q.State != "" {
		title = "MERCHANTS " + q.State
	}
	printMerchants(std.Out, title, listed, more, q, now)
	fmt.Fprintln(std.Out)
	printCounts(std.Out, rep)
	return nil
}

// hasProvider reports whether the report rep of the token broker at addr
// has provider (any, when ""); when it has not, it says so on Err,
// naming those it has: a filter on a misspelt provider would list
// nothing, as if all were well.
func hasProvider(std IO, addr string, rep opstate.Report, provider string) bool {
	if provider == "" {
		return true
	}
	names := make([]string, 0, len(rep.Providers))
	for _, p := range rep.Providers {
		if p.Name == provider {
			return true
		}
		names = append(names, p.Name)
	}
	fmt.Fprintf(std.Err, "the token broker at admin address %s has no provider %q: its providers are %s\n", addr, provider, dash(strings.Join(names, ", ")))
	return false
}

// attention are the states of merchants that need someone's attention,
// worst first.
func attention() []string {
	return slices.DeleteFunc(opstate.States(), func(s string) bool {
		return s == opstate.StateFresh || s == opstate.StateRefreshing || s == opstate.StateIdle
	})
}

// stateURI is the URI of GET /token_broker/state with its query.
func stateURI(provider, state, after string, limit int) string {
	v := url.Values{}
	for k, s := range map[string]string{"provider": provider, "state": state, "after": after} {
		if s != "" {
			v.Set(k, s)
		}
	}
	if limit > 0 {
		v.Set("limit", strconv.Itoa(limit))
	}
	if len(v) == 0 {
		return "/token_broker/state"
	}
	return "/token_broker/state?" + v.Encode()
}

// merchantsIn lists the merchants in states (counted in counts), each
// state's by page, MaxListed at most in all; more is how many others
// there are.
func merchantsIn(request AdminRequest, addr, provider string, states []string, counts map[string]int) (listed []opstate.Merchant, more int, err error) {
	for _, s := range states {
		after := ""
		for counts[s] > 0 && len(listed) < MaxListed {
			var page opstate.Report
			if err := askAdmin(request, addr, http.MethodGet, stateURI(provider, s, after, MaxListed-len(listed)), nil, &page); err != nil {
				return nil, 0, err
			}
			listed = append(listed, page.Merchants[:min(len(page.Merchants), MaxListed-len(listed))]...)
			if page.Next == "" || len(page.Merchants) == 0 {
				break
			}
			after = page.Next
		}
		more += counts[s]
	}
	return listed, max(more-len(listed), 0), nil
}

// printProviders prints the providers' table, a line per provider whose
// tokens are DPoP-bound (its key's algorithm and thumbprint) and the fleet
// tier's line.
func printProviders(w io.Writer, rep opstate.Report, now time.Time) {
	fmt.Fprintln(w, "PROVIDERS")
	if len(rep.Providers) == 0 {
		fmt.Fprintln(w, "  none")
	} else {
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		window := rep.Providers[0].Window
		fmt.Fprintf(tw, "NAME\tTYPE\tSTATUS\tBREAKER\tBACKOFF UNTIL\tREQUESTS/FAILURES (%s)\tMERCHANTS\tLAST ERROR\n", window)
		for _, p := range rep.Providers {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d/%d\t%d\t%s\n", p.Name, p.Type, p.Status, p.Breaker,
				when(p.BackoffUntil, now), p.Requests, p.Failures, p.Merchants, lastError(p.LastError, p.LastErrorAt, now))
		}
		tw.Flush()
		for _, p := range rep.Providers {
			if p.DPoP != nil {
				fmt.Fprintf(w, "%s: DPoP-bound tokens, %s key %s\n", p.Name, p.DPoP.Alg, p.DPoP.JKT)
			}
		}
	}
	if f := rep.Fleet; f != nil {
		up := "up"
		if !f.Up {
			up = "DOWN (each instance mints alone)"
		}
		fmt.Fprintf(w, "fleet tier (redis): %s", up)
		if f.Since != nil {
			fmt.Fprintf(w, " since %s", when(f.Since, now))
		}
		if f.LastError != "" {
			fmt.Fprintf(w, "; last error %s", lastError(printable(f.LastError), f.LastErrorAt, now))
		}
		fmt.Fprintln(w)
	}
}

// printMerchants prints the merchants' table.
func printMerchants(w io.Writer, title string, listed []opstate.Merchant, more int, q StatusQuery, now time.Time) {
	fmt.Fprintln(w, title)
	if len(listed) == 0 {
		fmt.Fprintln(w, "  none")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "MERCHANT\tPROVIDER\tORGANISATION\tSTATE\tLAST ERROR\tBACKOFF UNTIL\tTOKEN EXPIRES")
	for _, m := range listed {
		org := m.Organisation
		if m.Wildcard {
			org += " (wildcard)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Merchant, m.Provider, dash(org), m.State,
			lastError(m.LastError, m.LastErrorAt, now), when(m.BackoffUntil, now), when(m.Expiry, now))
	}
	tw.Flush()
	if more > 0 {
		state := q.State
		if state == "" {
			state = "STATE"
		}
		fmt.Fprintf(w, "... and %d more: caddy token-broker status --state %s --json [--after NEXT] (or GET /token_broker/state?state=%s&after=NEXT) lists them by page\n", more, state, state)
	}
}

// printCounts prints the merchants counted by state.
func printCounts(w io.Writer, rep opstate.Report) {
	fmt.Fprintln(w, "MERCHANTS BY STATE")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	total := 0
	for _, s := range opstate.States() {
		fmt.Fprintf(tw, "%s\t%d\t\n", s, rep.Counts[s])
		total += rep.Counts[s]
	}
	fmt.Fprintf(tw, "total\t%d\t\n", total)
	tw.Flush()
}

// lastError is an error code and when it happened, "-" for none.
func lastError(code string, at *time.Time, now time.Time) string {
	if code == "" {
		return "-"
	}
	if at == nil {
		return code
	}
	return code + " " + when(at, now)
}

// when is t relative to now and absolute: "in 42s (23:05:10 UTC)", "3m
// ago (23:01:00 UTC)"; the date too when it is not now's; "-" for nil.
func when(t *time.Time, now time.Time) string {
	if t == nil || t.IsZero() {
		return "-"
	}
	layout := "15:04:05 UTC"
	if y, m, d := t.UTC().Date(); y != now.UTC().Year() || m != now.UTC().Month() || d != now.UTC().Day() {
		layout = "2006-01-02 15:04 UTC"
	}
	abs := t.UTC().Format(layout)
	if d := t.Sub(now); d >= 0 {
		return fmt.Sprintf("in %s (%s)", span(d), abs)
	}
	return fmt.Sprintf("%s ago (%s)", span(now.Sub(*t)), abs)
}

// span is d in its largest unit, rounded down: 42s, 3m, 5h, 2d.
func span(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d/time.Minute))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d/time.Hour))
	}
	return fmt.Sprintf("%dd", int(d/(24*time.Hour)))
}

// printable is s, a text another party wrote (a provider's error code, a
// Redis error), quoted as a Go string when it holds a character that is
// not printable: a control sequence must not reach the terminal.
func printable(s string) string {
	if strings.IndexFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0 {
		return strconv.Quote(s)
	}
	return s
}

// dash is s, or "-" when it is empty.
func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
