package main

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// report renders the results as markdown: the summary table of issue 9
// (one row per merchant count, ratios sidecar/plain of the medians, and a
// row for the split registry when measured), the reloads, the sidecar's Go
// runtime figures next to RSS, then the medians themselves (with each
// server's bytes allocated per request and GC cycles per second).
func report(machine, method, plainInfo string, results []countResult, split *splitResult, wildcard string) string {
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
	if split != nil {
		fmt.Fprintf(&b, "| %s in %d files × %s, one edited | %s | %s (RSS %s after) | %s | – | – | – | – |\n",
			thousands(split.Files*split.PerFile), split.Files, thousands(split.PerFile), secs(split.Start),
			secs(split.Reload), mib(split.RSSAfterReload), mib(split.RSSIdle))
	}
	b.WriteString(reloadsText(results, split))
	b.WriteString(runtimeText(results, split))
	for _, r := range results {
		if len(r.Profiles) > 0 {
			fmt.Fprintf(&b, "\nProfiles of the sidecar at %s merchants (an extra, unmeasured %d s wrk run after the rounds; `go tool pprof -top FILE`): %s\n",
				thousands(r.Merchants), profileSeconds, strings.Join(r.Profiles, ", "))
		}
	}
	if wildcard != "" {
		fmt.Fprintf(&b, "\n%s\n", wildcard)
	}
	b.WriteString("\nMedians over the rounds:\n\n")
	b.WriteString("| merchants | server | rounds | req/s | p99 | CPU per request | allocated per request | GC cycles/s | errors | token requests |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range results {
		s, p := summarize(r.Sidecar), summarize(r.Plain)
		fmt.Fprintf(&b, "| %s | sidecar | %d | %.0f | %s | %s | %.0f B | %.1f | %d | warm-up %d in %s (%.0f/s); rounds %d |\n",
			thousands(r.Merchants), s.Rounds, s.RPS, ms(s.P99), us(s.CPU), s.Alloc, s.GCs, s.Errors,
			r.WarmTokens, secs(r.WarmTime), float64(r.WarmTokens)/math.Max(r.WarmTime.Seconds(), 1e-9), r.RoundTokens)
		fmt.Fprintf(&b, "| %s | plain | %d | %.0f | %s | %s | %.0f B | %.1f | %d | |\n",
			thousands(r.Merchants), p.Rounds, p.RPS, ms(p.P99), us(p.CPU), p.Alloc, p.GCs, p.Errors)
	}
	return b.String()
}

// reloadsText is the table of reloads: the unchanged single file of each
// merchant count (before the token warm-up, then with every token cached)
// and the split registry with one file edited.
func reloadsText(results []countResult, split *splitResult) string {
	var b strings.Builder
	b.WriteString("\nReloads (wall time of `caddy reload --force`, from the command to its exit):\n\n")
	b.WriteString("| registry | merchants | change | reload | RSS after | token requests caused by the reload (want 0) | edit took effect |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range results {
		fmt.Fprintf(&b, "| one file | %s | none | %s before the token warm-up; %s with every token cached | %s | %d (second reload + one request to each of %d warm merchants) | – |\n",
			thousands(r.Merchants), secs(r.Reload), secs(r.ReloadWarm), mib(r.RSSAfterReload), r.ReloadWarmTokens, r.ReloadWarmChecked)
	}
	if split != nil {
		fmt.Fprintf(&b, "| %d files × %s | %s → %s | one file: %s moved to %s, %s added | %s | %s | %d (reload + one request to each of %d warm merchants of unchanged entries) | %s (edited and added merchant: %d token requests, want 2) |\n",
			split.Files, thousands(split.PerFile), thousands(split.Files*split.PerFile), thousands(split.Files*split.PerFile+1),
			split.EditedID, split.EditedOrg, split.AddedID, secs(split.Reload), mib(split.RSSAfterReload),
			split.ReloadTokens, split.Warmed, yesNo(split.EditTokens == 2), split.EditTokens)
	}
	return b.String()
}

// memRow is one row of the Go runtime table.
type memRow struct {
	merchants int
	label     string // the registry, when not one file
	when      string
	rss       int64
	m         memStats
}

// runtimeText is the table of the sidecar's Go runtime figures next to
// its RSS: idle and with every merchant's token cached for each merchant
// count; idle and after the edit's reload for the split registry.
func runtimeText(results []countResult, split *splitResult) string {
	var rows []memRow
	for _, r := range results {
		rows = append(rows, memRow{r.Merchants, "", "idle", r.RSSIdle, r.MemIdle},
			memRow{r.Merchants, "", "with tokens", r.RSSWarm, r.MemWarm})
	}
	if split != nil {
		n, label := split.Files*split.PerFile, fmt.Sprintf(" in %d files", split.Files)
		rows = append(rows, memRow{n, label, "idle", split.RSSIdle, split.MemIdle},
			memRow{n + 1, label, "after the edit's reload", split.RSSAfterReload, split.MemAfterReload})
	}
	var b strings.Builder
	b.WriteString("\nGo runtime of the sidecar (admin API `/debug/vars` memstats, read with RSS; no GC forced; GC CPU fraction since start):\n\n")
	b.WriteString("| merchants | when | RSS | heap in use | heap alloc | heap retained | next GC | heap objects | heap in use per merchant | heap objects per merchant | GC cycles | GC CPU fraction | Sys |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, row := range rows {
		m, n := row.m, float64(row.merchants)
		fmt.Fprintf(&b, "| %s%s | %s | %s | %s | %s | %s | %s | %d | %s | %.1f | %d | %.3f | %s |\n",
			thousands(row.merchants), row.label, row.when, mib(row.rss), mibU(m.HeapInuse), mibU(m.HeapAlloc), mibU(m.retained()),
			mibU(m.NextGC), m.HeapObjects, perMerchantBytes(float64(m.HeapInuse)/n), float64(m.HeapObjects)/n,
			m.NumGC, m.GCCPUFraction, mibU(m.Sys))
	}
	return b.String()
}

// perMerchantBytes is a per-merchant size: bytes below 10 KiB, KiB above.
func perMerchantBytes(x float64) string {
	if x < 10<<10 {
		return fmt.Sprintf("%.0f B", x)
	}
	return fmt.Sprintf("%.0f KiB", x/(1<<10))
}

func yesNo(ok bool) string {
	if ok {
		return "yes"
	}
	return "NO"
}

func mibU(b uint64) string { return mib(int64(b)) }

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
