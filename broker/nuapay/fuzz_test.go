package nuapay

import (
	"net/http"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// FuzzParseToken: any body either parses into a token that can go
// into a header and expires no later than asked, or fails with an
// *broker.APIError; it never panics.
func FuzzParseToken(f *testing.F) {
	f.Add([]byte(`{"data":{"id":"t1","accessToken":"eyJ.a.b","tokenType":"BEARER","expiryTime":1545062272000,"status":"ACTIVE"}}`))
	f.Add([]byte(`{"data":{"accessToken":"x","tokenType":"bearer","expiryTime":-1}}`))
	f.Add([]byte(`{"data":null}`))
	f.Add([]byte(`<html>`))
	f.Add([]byte(`{"data":{"accessToken":"a\r\nb","expiryTime":99999999999999999999}}`))
	sent := time.Unix(1_700_000_000, 0)
	f.Fuzz(func(t *testing.T, body []byte) {
		tok, err := ParseToken(http.StatusCreated, body, sent, time.Hour)
		if err != nil {
			if _, ok := err.(*broker.APIError); !ok {
				t.Fatalf("error %T is not an *broker.APIError", err)
			}
			return
		}
		if tok.Value == "" || tok.Expiry.After(sent.Add(time.Hour)) || tok.Type != "Bearer" {
			t.Fatalf("token %+v: empty, or living longer than asked", tok)
		}
	})
}

// FuzzParseError: any error body gives an *broker.APIError with the status
// kept and a description; it never panics.
func FuzzParseError(f *testing.F) {
	f.Add(422, "", []byte(`{"returnCode":"42200","returnDescription":"Invalid","details":[{"code":"1","field":"expiresIn"}]}`))
	f.Add(400, "", []byte(`{"returnCode":null,"details":{"code":"1"}}`))
	f.Add(429, "7", []byte(`{}`))
	f.Add(503, "Wed, 21 Oct 2015 07:28:00 GMT", []byte(`<html>`))
	f.Fuzz(func(t *testing.T, status int, retryAfter string, body []byte) {
		ae := ParseError(status, http.Header{"Retry-After": {retryAfter}, "Ratelimit": {retryAfter}}, body, time.Unix(1_700_000_000, 0))
		if ae.StatusCode != status || (ae.Description == "" && http.StatusText(status) != "") {
			t.Fatalf("%+v", ae)
		}
		if ae.RetryAfter < 0 || ae.RetryAfter > time.Hour {
			t.Fatalf("retry after %s out of bounds", ae.RetryAfter)
		}
		_ = ae.Error()
	})
}
