package config

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// chunkProvider is a valid provider table for the chunk tests.
const chunkProvider = "[providers.p]\ntype = \"nuapay\"\nbase_url = \"https://n.example\"\napi_key = \"{env.NUAPAY_API_KEY}\"\n\n"

// chunkMerchant is a valid [merchants.ID] table.
func chunkMerchant(id string) string {
	return fmt.Sprintf("[merchants.%s]\nprovider = \"p\"\norganisation = \"org-%s\"\nscopes = [\"s\"]\n\n", id, strings.Trim(id, `"'`))
}

// chunkMerchants is n valid merchant tables m00..m(n-1).
func chunkMerchants(from, n int) string {
	var b strings.Builder
	for i := from; i < from+n; i++ {
		b.WriteString(chunkMerchant(fmt.Sprintf("m%02d", i)))
	}
	return b.String()
}

// chunkCases are files whose chunked parse must equal the whole file's
// parse, or fall back to it (nil).
var chunkCases = []struct {
	name     string
	data     string
	fallback bool // the chunked parse must give up
}{
	{"plain", chunkProvider + chunkMerchants(0, 8), false},
	{"CRLF", strings.ReplaceAll(chunkProvider+chunkMerchants(0, 8), "\n", "\r\n"), false},
	{"comments", "# registry\n" + chunkProvider + "# [merchants.c0]\n" + chunkMerchants(0, 4) + "[merchants.c1] # the one\nprovider = \"p\" # p\norganisation = \"o\"\nscopes = [\"s\"]\n" + chunkMerchants(4, 4), false},
	{"quoted ids", chunkProvider + chunkMerchant(`"a.b"`) + chunkMerchants(0, 4) + chunkMerchant(`'c-d'`) + chunkMerchant(`"x:y@z"`) + chunkMerchants(4, 4), false},
	{"ids out of order", chunkProvider + chunkMerchants(6, 4) + chunkMerchants(0, 4) + chunkMerchants(20, 3), false},
	{"wildcard in a later chunk", chunkProvider + chunkMerchants(0, 6) + "[merchants.\"*\"]\nprovider = \"p\"\norganisation = \"{merchant}\"\nscopes = [\"s\"]\n" + chunkMerchants(6, 3), false},
	{"provider after merchants", chunkMerchants(0, 6) + strings.Replace(chunkProvider, "[providers.p]", "[providers.q]", 1) + chunkMerchants(6, 4) + chunkProvider, false},
	{"multi-line array", chunkProvider + chunkMerchants(0, 4) + "[merchants.arr]\nprovider = \"p\"\norganisation = \"o\"\nscopes = [\n  \"a\",\n  \"b\",\n]\n" + chunkMerchants(4, 4), false},
	{"every merchant key", chunkProvider + chunkMerchants(0, 4) + "[merchants.all]\nprovider = \"p\"\norganisation = \"{env.SHOP_ORG}\"\nscopes = [\"b\", \"a\", \"b\"]\ntoken_lifetime = \"2h\"\naudience = \"aud\"\n" + chunkMerchants(4, 4), false},

	{"empty scopes", chunkProvider + chunkMerchants(0, 4) + "[merchants.e]\nprovider = \"p\"\norganisation = \"o\"\nscopes = []\n" + chunkMerchants(4, 4), false},
	{"scope not a string", chunkProvider + chunkMerchants(0, 4) + "[merchants.e]\nprovider = \"p\"\norganisation = \"o\"\nscopes = [1]\n" + chunkMerchants(4, 4), true},
	{"bad lifetime", chunkProvider + chunkMerchants(0, 4) + "[merchants.e]\nprovider = \"p\"\norganisation = \"o\"\nscopes = [\"s\"]\ntoken_lifetime = \"2 hours\"\n" + chunkMerchants(4, 4), true},
	{"capitalised key", chunkProvider + chunkMerchants(0, 4) + "[merchants.e]\nProvider = \"p\"\norganisation = \"o\"\nscopes = [\"s\"]\n" + chunkMerchants(4, 4), true},
	{"sub-table of a merchant", chunkProvider + chunkMerchants(0, 4) + "[merchants.e]\nprovider = \"p\"\norganisation = \"o\"\nscopes = [\"s\"]\n[merchants.e.x]\ny = 1\n" + chunkMerchants(4, 4), true},
	{"multi-line basic string holding headers", chunkProvider + chunkMerchants(0, 3) + "[merchants.s]\nprovider = \"p\"\norganisation = \"o\"\nscopes = [\"s\"]\naudience = \"\"\"\n[merchants.fake]\nprovider = \"p\"\n[merchants.fake2]\n\"\"\"\n" + chunkMerchants(3, 4), true},
	{"multi-line literal string holding headers", chunkProvider + chunkMerchants(0, 3) + "[merchants.s]\nprovider = \"p\"\norganisation = '''\n[merchants.fake]\norganisation = \"x\"\n'''\nscopes = [\"s\"]\n" + chunkMerchants(3, 4), true},
	{"array holding a header line", chunkProvider + chunkMerchants(0, 3) + "[merchants.s]\nprovider = \"p\"\norganisation = \"o\"\nscopes = [\n[merchants.fake]\n]\n" + chunkMerchants(3, 4), true},
	// Top-level dotted keys can only be in the first chunk, where they
	// define the entry as a table header does.
	{"top-level dotted keys", "merchants.d.provider = \"p\"\nmerchants.d.organisation = \"o\"\nmerchants.d.scopes = [\"s\"]\n" + chunkProvider + chunkMerchants(0, 8), false},
	{"merchants table with inline tables", chunkProvider + "[merchants]\ni1 = { provider = \"p\", organisation = \"o\", scopes = [\"s\"] }\n" + chunkMerchants(0, 8), true},
	{"inline merchants then headers", "merchants = { i1 = { provider = \"p\", organisation = \"o\", scopes = [\"s\"] } }\n" + chunkProvider + chunkMerchants(0, 8), true},
	{"merchants table defined twice", chunkProvider + chunkMerchants(0, 4) + "[merchants]\n" + chunkMerchants(4, 4) + "[merchants]\n", true},
	{"sub-table in another chunk", chunkProvider + chunkMerchants(0, 4) + "[merchants.m02.extra]\nx = 1\n" + chunkMerchants(4, 4), true},
	{"duplicate merchant across chunks", chunkProvider + chunkMerchants(0, 6) + chunkMerchants(2, 1) + chunkMerchants(6, 2), true},
	{"duplicate merchant in id order", chunkProvider + chunkMerchants(0, 6) + chunkMerchants(5, 3), true},
	{"duplicate provider across chunks", chunkProvider + chunkMerchants(0, 6) + chunkProvider + chunkMerchants(6, 2), true},
	{"error in the last chunk", chunkProvider + chunkMerchants(0, 8) + "[merchants.bad]\nprovider = \"p\"\norganisation = 5\n", true},
	{"syntax error in the last chunk", chunkProvider + chunkMerchants(0, 8) + "[merchants.bad]\nprovider = \"p\n", true},
	{"unknown key in the first chunk", chunkProvider + "[merchants.u]\nprovider = \"p\"\norganisation = \"o\"\nscopes = [\"s\"]\nscope = 1\n" + chunkMerchants(0, 8), true},
}

// checkChunked parses data in n chunks and in one piece: the chunked
// result must be the whole file's, or nil. It returns whether the chunks
// were used.
func checkChunked(t *testing.T, data []byte, n int) bool {
	t.Helper()
	src := Source{Path: "testdata/merchants.toml", Data: data}
	env := testEnv()
	whole := parseFile(src, env, 0, &compactor{})
	chunked := parseChunked(src, env, n)
	if chunked == nil {
		return false
	}
	if len(whole.errs) > 0 {
		t.Fatalf("n=%d: the chunks were joined but the whole file has problems: %v", n, whole.errs)
	}
	if !reflect.DeepEqual(chunked, whole) {
		t.Fatalf("n=%d: chunked parse\n%+v\nwhole-file parse\n%+v", n, *chunked, *whole)
	}
	return true
}

func TestParseChunked(t *testing.T) {
	for _, tc := range chunkCases {
		t.Run(tc.name, func(t *testing.T) {
			used := false
			for n := 2; n <= 8; n++ {
				used = checkChunked(t, []byte(tc.data), n) || used
			}
			if used == tc.fallback {
				t.Errorf("chunks used: %t, want %t", used, !tc.fallback)
			}
		})
	}
}

// TestParseFileChunkedErrors checks that a large file with a problem in
// any chunk reports it as the whole-file parse does (file, line, entry):
// the chunked parse falls back to it.
func TestParseFileChunkedErrors(t *testing.T) {
	base := string(benchRegistry(12_000)) // about 1.1 MB: 17 chunks
	if n := chunks(len(base)); n < 2 {
		t.Fatalf("%d chunks", n)
	}
	lines := strings.Count(base, "\n")
	for _, tc := range []struct {
		name string
		data string
		line int
		want string
	}{
		{"type error in the last chunk", base + "[merchants.bad]\nprovider = \"nuapay\"\norganisation = 5\n", lines + 3, `merchant "bad": field organisation: incompatible types`},
		{"unknown provider in the last chunk", base + "[merchants.bad]\nprovider = \"nuapy\"\norganisation = \"o\"\nscopes = [\"s\"]\n", lines + 2, `unknown provider "nuapy"`},
		{"syntax error in the last chunk", base + "[merchants.bad]\nprovider = \"nuapay\n", lines + 2, "merchants.toml:"},
		{"duplicate merchant across chunks", base + chunkMerchant("merchant-0000007"), lines + 1, "merchants.toml:"},
		{"error in a middle chunk", strings.Replace(base, "organisation = \"org0006000\"", "organisation = \"org0006000\"\nscope = 1", 1), 30010, `unknown key "merchants.merchant-0006000.scope"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := []byte(tc.data)
			_, got := parseWith("merchants.toml", data, Options{LookupEnv: benchEnv})
			src := Source{Path: "merchants.toml", Data: data}
			_, want := Merge("merchants.toml", []Source{src}, []*File{parseFile(src, benchEnv, 0, &compactor{})}, Options{LookupEnv: benchEnv})
			if got == nil || want == nil || got.Error() != want.Error() {
				t.Fatalf("got %v\nwant (whole file) %v", got, want)
			}
			if prefix := fmt.Sprintf("merchants.toml:%d: ", tc.line); !strings.HasPrefix(got.Error(), prefix) || !strings.Contains(got.Error(), tc.want) {
				t.Fatalf("got %v, want %q... %q", got, prefix, tc.want)
			}
		})
	}
}

// TestParseFileChunkedLines checks that the lines of a chunked parse are
// the whole file's, and that a large file is chunked at all.
func TestParseFileChunkedLines(t *testing.T) {
	data := benchRegistry(12_000)
	src := Source{Path: "merchants.toml", Data: data}
	chunked := parseChunked(src, benchEnv, chunks(len(data)))
	if chunked == nil {
		t.Fatal("not chunked")
	}
	if whole := parseFile(src, benchEnv, 0, &compactor{}); !reflect.DeepEqual(chunked, whole) {
		t.Fatal("the chunked parse differs from the whole file's")
	}
	reg, err := parseWith("merchants.toml", data, Options{LookupEnv: benchEnv})
	if err != nil {
		t.Fatal(err)
	}
	// merchant i's table is at line 7 + 5i (benchRegistry's layout).
	for _, i := range []int{0, 4999, 6000, 11999} {
		m := reg.Merchants[fmt.Sprintf("merchant-%07d", i)]
		if m == nil || m.Line != 7+5*i {
			t.Fatalf("merchant %d: %+v, want line %d", i, m, 7+5*i)
		}
	}
}

// FuzzParseChunked checks that a chunked parse is the whole file's parse
// or gives up, whatever the text and the number of chunks.
func FuzzParseChunked(f *testing.F) {
	for _, tc := range chunkCases {
		f.Add([]byte(tc.data), uint8(2))
		f.Add([]byte(tc.data), uint8(5))
	}
	f.Fuzz(func(t *testing.T, data []byte, n uint8) {
		checkChunked(t, data, 2+int(n%7))
	})
}
