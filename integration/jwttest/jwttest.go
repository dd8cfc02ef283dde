// Package jwttest holds JWT helpers for tests of the caller policy.
package jwttest

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// Forge changes a JWT's sub claim to "forged-i" (and, if kid is not "",
// its kid) but keeps its signature, which no longer matches.
func Forge(t testing.TB, token string, i int, kid string) string {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("forge: a JWT has 3 parts, got %d", len(parts))
	}
	if kid != "" {
		var hdr map[string]any
		raw, _ := base64.RawURLEncoding.DecodeString(parts[0])
		if err := json.Unmarshal(raw, &hdr); err != nil {
			t.Fatal(err)
		}
		hdr["kid"] = kid
		b, _ := json.Marshal(hdr)
		parts[0] = base64.RawURLEncoding.EncodeToString(b)
	}
	var claims map[string]any
	raw, _ := base64.RawURLEncoding.DecodeString(parts[1])
	if err := json.Unmarshal(raw, &claims); err != nil {
		t.Fatal(err)
	}
	claims["sub"] = fmt.Sprintf("forged-%d", i)
	b, _ := json.Marshal(claims)
	parts[1] = base64.RawURLEncoding.EncodeToString(b)
	return strings.Join(parts, ".")
}
