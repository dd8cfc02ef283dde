package main

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// report renders the results as markdown: the summary table of issue 9
// (one row per merchant count, ratios sidecar/plain of the medians), then
// the medians themselves.
func report(machine, method, plainInfo string, results []countResult, wildcard string) string {
	var b strings.Builder
	b.WriteString("\n## End-to-end: sidecar vs Caddy with a static header (separate processes)\n\n")
	fmt.Fprintf(&b, "- machine: %s\n- method: %s\n- %s\n\n", machine, method, plainInfo)
	b.WriteString("| merchants | start | reload | idle RSS | RSS with tokens | CPU per request vs Caddy with a static header (same routes) | throughput ratio | p99 ratio |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range results {
		s, p := summarize(r.Sidecar), summarize(r.Plain)
		fmt.Fprintf(&b, "| %s | %s | %s (RSS %s after) | %s | %s | %s | %s | %s |\n",
			thousands(r.Merchants), secs(r.Start), secs(r.Reload), mib(r.RSSAfterReload), mib(r.RSSIdle), mib(r.RSSWarm),
			ratioText(float64(s.CPU), float64(p.CPU)), ratioText(s.RPS, p.RPS), ratioText(float64(s.P99), float64(p.P99)))
	}
	if wildcard != "" {
		fmt.Fprintf(&b, "\n%s\n", wildcard)
	}
	b.WriteString("\nMedians over the rounds:\n\n")
	b.WriteString("| merchants | server | rounds | req/s | p99 | CPU per request | errors | token requests |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range results {
		s, p := summarize(r.Sidecar), summarize(r.Plain)
		fmt.Fprintf(&b, "| %s | sidecar | %d | %.0f | %s | %s | %d | warm-up %d in %s (%.0f/s); rounds %d |\n",
			thousands(r.Merchants), s.Rounds, s.RPS, ms(s.P99), us(s.CPU), s.Errors,
			r.WarmTokens, secs(r.WarmTime), float64(r.WarmTokens)/math.Max(r.WarmTime.Seconds(), 1e-9), r.RoundTokens)
		fmt.Fprintf(&b, "| %s | plain | %d | %.0f | %s | %s | %d | |\n",
			thousands(r.Merchants), p.Rounds, p.RPS, ms(p.P99), us(p.CPU), p.Errors)
	}
	return b.String()
}

// ratioText is a/b with 2 decimals; "n/a" when undefined.
func ratioText(a, b float64) string {
	r := ratio(a, b)
	if math.IsNaN(r) {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", r)
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }
func ms(d time.Duration) string   { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }
func us(d time.Duration) string   { return fmt.Sprintf("%.1f µs", float64(d)/float64(time.Microsecond)) }
func mib(b int64) string          { return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20)) }

// thousands writes n with a space every three digits: 100 000.
func thousands(n int) string {
	s := fmt.Sprint(n)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(' ')
		}
		b.WriteRune(c)
	}
	return b.String()
}
