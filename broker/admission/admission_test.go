package admission

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
)

func TestHeaderMerchant(t *testing.T) {
	const name = "X-Merchant-Id"
	for _, tt := range []struct {
		name string
		hdr  http.Header
		want string
		code errcode.Code
	}{
		{"one", http.Header{name: {"acme"}}, "acme", 0},
		{"missing", http.Header{}, "", errcode.MissingMerchant},
		{"empty", http.Header{name: {""}}, "", errcode.MissingMerchant},
		{"malformed", http.Header{name: {"ac me"}}, "", errcode.InvalidMerchant},
		{"twice", http.Header{name: {"acme", "globex"}}, "", errcode.AmbiguousMerchant},
		{"underscore twin", http.Header{name: {"acme"}, "X-Merchant_id": {"globex"}}, "", errcode.AmbiguousMerchant},
		{"dot twin alone", http.Header{"X.Merchant.Id": {"globex"}}, "", errcode.AmbiguousMerchant},
		{"other header", http.Header{name: {"acme"}, "X_Request_Id": {"1"}}, "acme", 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, code := HeaderMerchant(tt.hdr, name)
			if got != tt.want || code != tt.code {
				t.Fatalf("HeaderMerchant = %q, %v; want %q, %v", got, code, tt.want, tt.code)
			}
		})
	}
}

func TestUnbound(t *testing.T) {
	other := errors.New("registry gone")
	for _, tt := range []struct {
		err   error
		code  errcode.Code
		cause error
	}{
		{bindings.ErrTooManyMerchants, errcode.TooManyMerchants, nil},
		{fmt.Errorf("m: %w", bindings.ErrUnknownMerchant), errcode.UnknownMerchant, nil},
		{&listingRefusal{code: errcode.OrganisationsUnavailable}, errcode.OrganisationsUnavailable, nil},
		{other, errcode.UnknownMerchant, other},
	} {
		rf := Unbound("acme", tt.err)
		if rf.Code != tt.code || rf.Merchant != "acme" || rf.Cause != tt.cause {
			t.Errorf("Unbound(%v) = %+v, want code %v cause %v", tt.err, rf, tt.code, tt.cause)
		}
	}
}

func TestRefusalAnswer(t *testing.T) {
	for _, tt := range []struct {
		name   string
		rf     Refusal
		header string // a header the answer must carry
	}{
		{"method", Refusal{Code: errcode.MethodRefused}, "Allow"},
		{"merchant", Refusal{Code: errcode.UnknownMerchant, Merchant: "acme"}, "Cache-Control"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			tt.rf.Prepare(rec.Header(), zap.NewNop(), nil)
			if err := tt.rf.Write(rec); err != nil {
				t.Fatal(err)
			}
			var body ErrorBody
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
				t.Fatal(err)
			}
			if rec.Code != tt.rf.Code.Status() || body.Error != tt.rf.Code.String() || body.Merchant != tt.rf.Merchant || body.Message == "" {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			if rec.Header().Get(tt.header) == "" || rec.Header().Get("Content-Type") != "application/json" {
				t.Fatalf("headers %v", rec.Header())
			}
		})
	}
}
