package challenge

import (
	"net/http"
	"testing"
)

// TestError: the error and error_description of the first challenge that
// has an error, both from that same challenge; parameter names in any
// letter case; what a quoted-string holds (a comma, "error=", a
// quoted-pair) is its value, never a parameter.
func TestError(t *testing.T) {
	for _, tt := range []struct {
		name   string
		fields []string
		want   Challenge
		ok     bool
	}{
		{"token form", []string{`Bearer error=invalid_client`}, Challenge{"Bearer", "invalid_client", ""}, true},
		{"with a description", []string{`Basic realm="bank", error="invalid_client", error_description="client \"c\" failed"`},
			Challenge{"Basic", "invalid_client", `client "c" failed`}, true},
		{"quoted comma inside the realm", []string{`Basic realm="login, error=invalid_client"`}, Challenge{}, false},
		{"quoted error inside another value", []string{`Bearer error_description="error=\"invalid_token\""`}, Challenge{}, false},
		{"Error= in upper case", []string{`Bearer Error="invalid_token", ERROR_DESCRIPTION="expired"`}, Challenge{"Bearer", "invalid_token", "expired"}, true},
		{"two challenges, each with its description", []string{`Bearer error="invalid_token", error_description="expired", DPoP error="use_dpop_nonce", error_description="nonce required"`},
			Challenge{"Bearer", "invalid_token", "expired"}, true},
		{"the description of the challenge with the error", []string{`Basic error_description="not this one", DPoP error="use_dpop_nonce"`},
			Challenge{"DPoP", "use_dpop_nonce", ""}, true},
		{"backslash in a quoted value", []string{`DPoP error="use_dpop_nonce", error_description="a \\ b \"c\""`},
			Challenge{"DPoP", "use_dpop_nonce", `a \ b "c"`}, true},
		{"the first error of a challenge", []string{`Bearer error="a", error="b"`}, Challenge{"Bearer", "a", ""}, true},
		{"a description without an error", []string{`Basic realm="x", error_description="bad"`}, Challenge{}, false},
		{"after a token68", []string{`Basic dXNlcjpwYXNz==, Bearer error="invalid_token"`}, Challenge{"Bearer", "invalid_token", ""}, true},
		{"after a token68 with / and +", []string{`Basic dX/Nl+cj==, Bearer error="invalid_token"`}, Challenge{"Bearer", "invalid_token", ""}, true},
		{"an unquoted value of two words", []string{`DPoP algs=ES256 PS256, error="use_dpop_nonce"`}, Challenge{"DPoP", "use_dpop_nonce", ""}, true},
		{"an unquoted value with a slash", []string{`Bearer realm=a.com/x, error="invalid_token"`}, Challenge{"Bearer", "invalid_token", ""}, true},
		{"a scheme after a comma", []string{`Basic realm=x, Bearer error="invalid_token"`}, Challenge{"Bearer", "invalid_token", ""}, true},
		{"no challenge", nil, Challenge{}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{"Www-Authenticate": tt.fields}
			got, ok := Error(h)
			if got != tt.want || ok != tt.ok {
				t.Errorf("Error(%q) = %+v, %v; want %+v, %v", tt.fields, got, ok, tt.want, tt.ok)
			}
		})
	}
}

// TestTokenError: any Bearer or DPoP challenge (the scheme in any letter
// case) with the error code counts, not only the first with an error;
// another scheme's never.
func TestTokenError(t *testing.T) {
	for _, tt := range []struct {
		name   string
		fields []string
		code   string
		want   bool
	}{
		{"of a scheme asked for", []string{`Basic error="invalid_client", error_description="basic"`, `dpop error="use_dpop_nonce", error_description="dpop"`}, "use_dpop_nonce", true},
		{"none of the schemes asked for", []string{`Basic error="invalid_token"`}, "invalid_token", false},
		{"after another error", []string{`Bearer error="insufficient_scope", DPoP error="invalid_token"`}, "invalid_token", true},
		{"another error", []string{`Bearer error="insufficient_scope"`}, "invalid_token", false},
		{"no challenge", nil, "invalid_token", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := TokenError(http.Header{"Www-Authenticate": tt.fields}, tt.code); got != tt.want {
				t.Errorf("TokenError(%q, %q) = %v, want %v", tt.fields, tt.code, got, tt.want)
			}
		})
	}
}

// TestCutParamValue: a parameter value is a token or a quoted-string, whose
// quoted-pairs are unescaped; an unterminated quoted-string runs to the end.
func TestCutParamValue(t *testing.T) {
	for _, tt := range []struct {
		in, value, rest string
	}{
		{`invalid_token, realm="x"`, "invalid_token", `, realm="x"`},
		{`"invalid_token", realm="x"`, "invalid_token", `, realm="x"`},
		{`""`, "", ""},
		{`"a \"b\" c\\", d`, `a "b" c\`, ", d"},
		{`a.com/x, error=y`, "a.com/x", ", error=y"},
		{`bm9uY2U=, b`, "bm9uY2U=", ", b"},
		{`"ends early`, "ends early", ""},
		{`"ends \"early`, `ends "early`, ""},
		{`"ends on \`, `ends on \`, ""},
	} {
		value, rest := cutParamValue(tt.in)
		if value != tt.value || rest != tt.rest {
			t.Errorf("cutParamValue(%s) = %q, %q; want %q, %q", tt.in, value, rest, tt.value, tt.rest)
		}
	}
}
