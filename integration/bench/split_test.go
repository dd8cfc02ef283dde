package main

import (
	"bytes"
	"expvar"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/config"
)

func benchEnv(k string) (string, bool) {
	if k == apiKeyEnv {
		return apiKey, true
	}
	return "", false
}

// The split registry is a folder the broker loads as one registry; the
// edit changes only the last file (one organisation, one added merchant),
// and the warmed merchants are entries the edit does not change.
func TestSplitLayout(t *testing.T) {
	for _, l := range []splitLayout{{files: 2, perFile: 2}, {files: 3, perFile: 7}, {files: 10, perFile: 1000}} {
		t.Run(fmt.Sprintf("%dx%d", l.files, l.perFile), func(t *testing.T) {
			if err := l.validate(); err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			if err := l.write(dir, "http://127.0.0.1:9"); err != nil {
				t.Fatal(err)
			}
			files, err := config.Files(dir)
			if err != nil || len(files) != l.files+1 || filepath.Base(files[0]) != providersFile {
				t.Fatalf("registry files %v (%v), want %s and %d merchant files", files, err, providersFile, l.files)
			}
			before := readAll(t, files)
			reg, err := config.LoadWith(dir, config.Options{LookupEnv: benchEnv})
			if err != nil {
				t.Fatal(err)
			}
			if len(reg.Merchants) != l.total() || len(reg.Providers) != 1 {
				t.Fatalf("%d merchants, %d providers; want %d and 1", len(reg.Merchants), len(reg.Providers), l.total())
			}
			for _, i := range []int{0, l.perFile, l.total() - 1, l.editedMerchant()} {
				if m := reg.Merchants[merchantID(i)]; m == nil || m.Organisation != orgID(i) {
					t.Errorf("merchant %s: %+v, want organisation %s", merchantID(i), m, orgID(i))
				}
			}

			if err := l.edit(dir); err != nil {
				t.Fatal(err)
			}
			after := readAll(t, files)
			for i, f := range files {
				changed := !bytes.Equal(before[i], after[i])
				if want := f == filepath.Join(dir, l.fileName(l.edited())); changed != want {
					t.Errorf("%s: changed %v, want %v", f, changed, want)
				}
			}
			if files2, _ := config.Files(dir); !slices.Equal(files, files2) {
				t.Errorf("files after the edit %v, want %v (no temporary file left)", files2, files)
			}
			reg, err = config.LoadWith(dir, config.Options{LookupEnv: benchEnv})
			if err != nil {
				t.Fatal(err)
			}
			if len(reg.Merchants) != l.total()+1 {
				t.Fatalf("%d merchants after the edit, want %d", len(reg.Merchants), l.total()+1)
			}
			for id, org := range map[string]string{merchantID(l.editedMerchant()): orgID(l.total()),
				merchantID(l.addedMerchant()): orgID(l.total() + 1), merchantID(l.editedMerchant() + 1): orgID(l.editedMerchant() + 1)} {
				if m := reg.Merchants[id]; m == nil || m.Organisation != org {
					t.Errorf("after the edit, merchant %s: %+v, want organisation %s", id, m, org)
				}
			}
			// The token API knows every organisation of both forms.
			if l.orgs() <= l.total()+1 {
				t.Errorf("orgs() = %d, want > %d", l.orgs(), l.total()+1)
			}

			warmed := l.warmed()
			if want := (l.files-1)*min(splitWarmPerFile, l.perFile) + 1; len(warmed) != want {
				t.Errorf("%d warmed merchants, want %d", len(warmed), want)
			}
			seen := map[string]bool{}
			for _, id := range warmed {
				if seen[id] || id == merchantID(l.editedMerchant()) || id == merchantID(l.addedMerchant()) || reg.Merchants[id] == nil {
					t.Errorf("warmed merchant %s: duplicate, edited, added or unknown", id)
				}
				seen[id] = true
			}
		})
	}
	for _, l := range []splitLayout{{files: 1, perFile: 10}, {files: 10, perFile: 1}, {files: 10, perFile: 1_000_000}} {
		if err := l.validate(); err == nil {
			t.Errorf("%+v: valid, want an error", l)
		}
	}
}

func readAll(t *testing.T, files []string) [][]byte {
	t.Helper()
	var out [][]byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

// parseMemStats reads the answer of a real expvar handler (the one Caddy's
// admin API serves at /debug/vars) and refuses answers without memstats.
func TestParseMemStats(t *testing.T) {
	srv := httptest.NewServer(expvar.Handler())
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	m, err := parseMemStats(body)
	if err != nil {
		t.Fatal(err)
	}
	if m.HeapInuse == 0 || m.HeapAlloc == 0 || m.HeapObjects == 0 || m.Sys < m.HeapInuse || m.NextGC == 0 || m.retained() < m.HeapInuse {
		t.Errorf("memstats %+v: zero or inconsistent figures", m)
	}
	for _, tc := range []struct{ name, body, want string }{
		{"not JSON", "<html>", "not JSON"},
		{"no memstats", `{"cmdline":["caddy"]}`, `no "memstats"`},
		{"empty memstats", `{"memstats":{}}`, "without HeapInuse"},
	} {
		if _, err := parseMemStats([]byte(tc.body)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one containing %q", tc.name, err, tc.want)
		}
	}
}

// The flags: defaults (and BENCH_QUICK's), -wildcard 0 skipping the
// wildcard case without checking its other flags, the split case and
// -profile.
func TestParseFlags(t *testing.T) {
	o, timeout, err := parseFlags(nil, false)
	if err != nil {
		t.Fatal(err)
	}
	if o.rounds != 7 || o.wildcard != 1_000_000 || o.split != (splitLayout{10, 10_000}) || o.profile != "" || o.sidecarEnv != nil || timeout != 45*time.Minute ||
		!slices.Equal(o.merchants, []int{1, 1000, 100000}) {
		t.Errorf("defaults: %+v", o)
	}
	if o, _, err = parseFlags(nil, true); err != nil || o.rounds != 1 || o.round != 2*time.Second || o.split.files != 10 {
		t.Errorf("BENCH_QUICK defaults: %+v, %v", o, err)
	}
	for _, tc := range []struct {
		args []string
		ok   bool
		want func(options) bool
	}{
		{[]string{"-wildcard", "0", "-wildcard-time", "1s", "-wildcard-active", "0"}, true, func(o options) bool { return o.wildcard == 0 }},
		{[]string{"-wildcard-time", "1s"}, false, nil},
		{[]string{"-split-files", "0", "-split-merchants", "0"}, true, func(o options) bool { return o.split.files == 0 }},
		{[]string{"-split-files", "10", "-split-merchants", "1000"}, true, func(o options) bool { return o.split == splitLayout{10, 1000} }},
		{[]string{"-split-files", "1"}, false, nil},
		{[]string{"-sidecar-env", "GOGC=400, GODEBUG=gctrace=1"}, true, func(o options) bool {
			return slices.Equal(o.sidecarEnv, []string{"GOGC=400", "GODEBUG=gctrace=1"})
		}},
		{[]string{"-sidecar-env", "GOGC"}, false, nil},
		{[]string{"-sidecar-env", "=400"}, false, nil},
		{[]string{"-profile", "/tmp/prof", "-merchants", "1,1000"}, true, func(o options) bool {
			return o.profile == "/tmp/prof" && slices.Equal(o.merchants, []int{1, 1000})
		}},
	} {
		o, _, err := parseFlags(tc.args, false)
		if (err == nil) != tc.ok || (tc.ok && !tc.want(o)) {
			t.Errorf("%v: %+v, %v; want ok %v", tc.args, o, err, tc.ok)
		}
	}
}
