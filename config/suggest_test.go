package config

import "testing"

func TestEditDistance(t *testing.T) {
	for _, tt := range []struct {
		a, b string
		want int
	}{
		{"", "", 0},
		{"abc", "", 3},
		{"", "abc", 3},
		{"token_lifetime", "token_lifetime", 0},
		{"token_lifetme", "token_lifetime", 1},  // deletion
		{"token_liftime", "token_lifetime", 1},  // deletion
		{"tokne_lifetime", "token_lifetime", 1}, // transposition
		{"apikey", "api_key", 1},
		{"scope", "scopes", 1},
		{"kitten", "sitting", 3},
		{"ca", "abc", 3}, // optimal string alignment, not full Damerau (2)
	} {
		if got := editDistance(tt.a, tt.b); got != tt.want {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tt.a, tt.b, got, tt.want)
		}
	}
}

func TestNearest(t *testing.T) {
	nuapay := []string{"type", "timeout", "tls", "base_url", "api_key", "token_lifetime", "organisations_path"}
	for _, tt := range []struct {
		key  string
		keys []string
		want string
	}{
		{"token_lifetme", nuapay, "token_lifetime"},
		{"apikey", nuapay, "api_key"},
		{"baseurl", nuapay, "base_url"},
		{"Type", nuapay, "type"},
		{"scope", []string{"provider", "organisation", "scopes", "token_lifetime", "audience"}, "scopes"},
		{"client_id", nuapay, ""}, // nothing close
		{"tl", nuapay, "tls"},     // short keys: one edit at most
		{"cert", []string{"client_cert", "client_key", "ca_file", "server_name"}, ""},
	} {
		if got := nearest(tt.key, tt.keys); got != tt.want {
			t.Errorf("nearest(%q) = %q, want %q", tt.key, got, tt.want)
		}
	}
}
