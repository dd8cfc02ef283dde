package oauth

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// FuzzTokenResponse serves arbitrary token-endpoint answers to the
// client-credentials source: each either gives a bearer token that can go
// into a header, with an expiry in the future, or an *broker.APIError that
// does not echo the client secret; nothing panics.
func FuzzTokenResponse(f *testing.F) {
	f.Add(200, "application/json", `{"access_token":"eyJ.a.b","token_type":"bearer","expires_in":86400}`)
	f.Add(200, "application/json", `{"access_token":"x","token_type":"DPoP"}`)
	f.Add(200, "application/json", `{"error":"invalid_client","error_description":"fuzz-secret-1"}`)
	f.Add(400, "application/json", `{"error":"invalid_grant"}`)
	f.Add(200, "application/x-www-form-urlencoded", `access_token=abc&token_type=bearer&expires_in=-5`)
	f.Add(503, "text/html", `<html>`)
	f.Add(200, "application/json", `{"access_token":"a\r\nb","token_type":"bearer","expires_in":"1e308"}`)

	var status atomic.Int64
	var ctype, body atomic.Value
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", ctype.Load().(string))
		w.WriteHeader(int(status.Load()))
		w.Write([]byte(body.Load().(string)))
	}))
	f.Cleanup(srv.Close)
	src, err := NewClientCredentials(Config{Name: "fuzz", TokenURL: srv.URL, ClientID: "c", ClientSecret: "fuzz-secret-1",
		AuthMethod: ClientSecretPost, DefaultLifetime: time.Minute})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, code int, contentType, payload string) {
		if code < 200 || code > 599 {
			code = 200 + (code&0x7fffffff)%400
		}
		status.Store(int64(code))
		ctype.Store(strings.Map(func(r rune) rune {
			if r < ' ' || r > '~' {
				return -1
			}
			return r
		}, contentType))
		body.Store(payload)
		tok, err := src.Token(context.Background(), broker.Request{Merchant: "m", Scopes: []string{"a"}})
		if err != nil {
			var ae *broker.APIError
			var re *broker.RequestError
			if !errors.As(err, &ae) && !errors.As(err, &re) {
				t.Fatalf("error %T %v is neither an APIError nor a RequestError", err, err)
			}
			if strings.Contains(err.Error(), "fuzz-secret-1") {
				t.Fatalf("error echoes the client secret: %v", err)
			}
			return
		}
		v := tok.Value.Reveal()
		if v == "" || strings.ContainsAny(v, "\r\n\x00 ") || !tok.Expiry.After(time.Now()) {
			t.Fatalf("bad token accepted: %q expiry %s", v, tok.Expiry)
		}
	})
}
