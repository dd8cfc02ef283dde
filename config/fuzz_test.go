package config

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParse checks that parse never panics, that success means a usable
// registry, and that failure means *Error values without the secret.
func FuzzParse(f *testing.F) {
	f.Add(readGood(f))
	f.Add([]byte(badBase))
	f.Add([]byte(badBase + "[providers.p.tls]\nclient_cert = \"qwac.pem\"\n[merchants]\nbeta = { provider = \"p\", organisation = \"o\", scopes = [\"s\"] }\n"))
	path := filepath.Join("testdata", "merchants.toml") // relative files: those of testdata
	env := testEnv()
	f.Fuzz(func(t *testing.T, data []byte) {
		reg, err := parse(path, data, env)
		if err != nil {
			if reg != nil {
				t.Fatalf("a registry with an error: %v", err)
			}
			for _, e := range unwrapAll(err) {
				var ce *Error
				if !errors.As(e, &ce) || ce.File != path {
					t.Fatalf("%T %v is not a *config.Error about %s", e, e, path)
				}
			}
			// The secret may show only where the input misuses its
			// variable in a non-secret value, which is echoed.
			ref := []byte("NUAPAY_API_KEY")
			if bytes.Count(data, ref) == bytes.Count(data, []byte(`api_key = "{env.NUAPAY_API_KEY}"`)) && strings.Contains(err.Error(), secretValue) {
				t.Fatalf("the error reveals the secret: %v", err)
			}
			return
		}
		if reg == nil || len(reg.Merchants) == 0 {
			t.Fatalf("no error but registry %+v", reg)
		}
		for id := range reg.Merchants {
			if _, err := reg.Binding(id, nil); err != nil {
				t.Fatalf("Binding(%q): %v", id, err)
			}
		}
	})
}
