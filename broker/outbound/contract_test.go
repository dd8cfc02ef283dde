package outbound

import (
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
)

// testToken is the token the tests set.
const testToken = "tok-SECRET-value"

// TestOutboundContract: what reaches the next handler, whatever the caller
// sent. Connection options naming an owned header are removed, so that
// reverse_proxy cannot drop the injected token as hop-by-hop.
func TestOutboundContract(t *testing.T) {
	tests := []struct {
		name           string
		interaction    bool
		callerHeader   string // with a caller policy
		sent           [][2]string
		wantConnection []string // nil: no Connection header
		wantAbsent     []string
	}{
		{name: "caller credentials and the merchant header removed",
			sent: [][2]string{{"Authorization", "Bearer caller"}, {"Authorization", "Basic eDp5"},
				{"Proxy-Authorization", "Basic eDp5"}},
			wantAbsent: []string{"Proxy-Authorization", "X-Merchant-Id"}},
		{name: "caller's DPoP proofs removed",
			sent:       [][2]string{{"DPoP", "eyJ.caller.proof"}, {"dpop", "eyJ.second"}, {"Connection", "DPoP"}},
			wantAbsent: []string{"Dpop", "Connection"}},
		{name: "Connection naming the token header",
			sent:       [][2]string{{"Connection", "Authorization"}},
			wantAbsent: []string{"Connection"}},
		{name: "Connection option in any case and spacing",
			sent:           [][2]string{{"Connection", "  aUtHoRiZaTiOn  ,keep-alive"}},
			wantConnection: []string{"keep-alive"}},
		{name: "Connection in two fields",
			sent:           [][2]string{{"Connection", "keep-alive"}, {"Connection", "Proxy-Authorization, X-Merchant-Id"}},
			wantConnection: []string{"keep-alive"}},
		{name: "websocket upgrade kept",
			sent:           [][2]string{{"Connection", "Upgrade, Authorization"}, {"Upgrade", "websocket"}},
			wantConnection: []string{"Upgrade"}},
		{name: "unrelated options kept untouched",
			sent:           [][2]string{{"Connection", "X-Custom, keep-alive"}, {"X-Custom", "1"}},
			wantConnection: []string{"X-Custom, keep-alive"}},
		{name: "interaction id the broker adds",
			interaction: true,
			sent:        [][2]string{{"Connection", "X-Fapi-Interaction-Id"}},
			wantAbsent:  []string{"Connection"}},
		{name: "interaction id the broker does not add is the caller's",
			sent:           [][2]string{{"Connection", "x-fapi-interaction-id"}},
			wantConnection: []string{"x-fapi-interaction-id"}},
		{name: "caller JWT header",
			callerHeader: "X-Caller-Jwt",
			sent:         [][2]string{{"Connection", "X-Caller-Jwt"}, {"X-Caller-Jwt", "eyJ..."}},
			wantAbsent:   []string{"Connection", "X-Caller-Jwt"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := Contract{Merchant: "X-Merchant-Id", Caller: tt.callerHeader, Interaction: tt.interaction}
			r := httptest.NewRequest("GET", "/", nil)
			r.Header.Set("X-Merchant-Id", "acme")
			for _, kv := range tt.sent {
				r.Header.Add(kv[0], kv[1])
			}
			o.Prepare(r, "Bearer "+testToken)
			if v := r.Header.Values("Authorization"); !slices.Equal(v, []string{"Bearer " + testToken}) {
				t.Errorf("Authorization = %q, want the token once", v)
			}
			if got := r.Header["Connection"]; !slices.Equal(got, tt.wantConnection) {
				t.Errorf("Connection = %q, want %q", got, tt.wantConnection)
			}
			for _, name := range tt.wantAbsent {
				if v, ok := r.Header[name]; ok {
					t.Errorf("%s = %q, want it removed", name, v)
				}
			}
			if !o.Carries(r, "Bearer "+testToken) {
				t.Error("carries = false after prepare")
			}
		})
	}
}

func TestOutboundCarries(t *testing.T) {
	const v = "Bearer " + testToken
	o := Contract{}
	for _, tt := range []struct {
		name string
		hdr  http.Header
		want bool
	}{
		{"as set", http.Header{"Authorization": {v}}, true},
		{"removed by a later handler", http.Header{}, false},
		{"replaced", http.Header{"Authorization": {"Bearer other"}}, false},
		{"added to", http.Header{"Authorization": {v, "Bearer other"}}, false},
		{"named in Connection again", http.Header{"Authorization": {v}, "Connection": {"close, authorization"}}, false},
		{"other Connection options", http.Header{"Authorization": {v}, "Connection": {"Upgrade"}}, true},
	} {
		if got := o.Carries(&http.Request{Header: tt.hdr}, v); got != tt.want {
			t.Errorf("%s: carries = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestOutboundCheck: what Check refuses.
func TestOutboundCheck(t *testing.T) {
	for _, tt := range []struct {
		name       string
		method     string
		trailers   []string
		wantStatus int
		wantCode   string
	}{
		{"plain", "POST", nil, 0, ""},
		{"harmless trailer", "POST", []string{"X-Checksum"}, 0, ""},
		{"Authorization trailer", "POST", []string{"Authorization"}, 400, "forbidden_trailer"},
		{"Proxy-Authorization trailer", "POST", []string{"Proxy-Authorization"}, 400, "forbidden_trailer"},
		{"DPoP trailer", "POST", []string{"Dpop"}, 400, "forbidden_trailer"},
		{"merchant trailer", "POST", []string{"X-Checksum", "X-Merchant-Id"}, 400, "forbidden_trailer"},
		{"caller JWT trailer", "POST", []string{"X-Caller-Jwt"}, 400, "forbidden_trailer"},
		{"TRACE", "TRACE", nil, 405, "method_refused"},
		{"CONNECT", "CONNECT", nil, 405, "method_refused"},
		{"connect", "connect", nil, 405, "method_refused"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o := Contract{Merchant: "X-Merchant-Id", Caller: "X-Caller-Jwt"}
			r := httptest.NewRequest(tt.method, "/", strings.NewReader("x"))
			r.Header.Set("X-Merchant-Id", "acme")
			for _, name := range tt.trailers {
				if r.Trailer == nil {
					r.Trailer = http.Header{}
				}
				r.Trailer[name] = nil
			}
			c := o.Check(r)
			status, code := c.Status(), c.String()
			if status != tt.wantStatus || code != tt.wantCode {
				t.Fatalf("check = %d %q, want %d %q", status, code, tt.wantStatus, tt.wantCode)
			}
		})
	}
}

// TestOutboundCheckExtendedConnect: an extended CONNECT for a websocket
// (over HTTP/2 or HTTP/3) is an upgrade, not a tunnel: it goes on; any
// other CONNECT is refused.
func TestOutboundCheckExtendedConnect(t *testing.T) {
	h2 := httptest.NewRequest("CONNECT", "/ws", nil)
	h2.ProtoMajor, h2.Proto = 2, "HTTP/2.0"
	h2.Header.Set(":protocol", "websocket")
	h3 := httptest.NewRequest("CONNECT", "/ws", nil)
	h3.ProtoMajor, h3.Proto = 3, "websocket"
	other2 := httptest.NewRequest("CONNECT", "/ws", nil)
	other2.ProtoMajor, other2.Proto = 2, "HTTP/2.0"
	other2.Header.Set(":protocol", "connect-udp")
	plain3 := httptest.NewRequest("CONNECT", "/ws", nil)
	plain3.ProtoMajor, plain3.Proto = 3, "HTTP/3.0"
	for _, tt := range []struct {
		name string
		r    *http.Request
		want errcode.Code
	}{
		{"HTTP/2 :protocol websocket", h2, 0},
		{"HTTP/3 websocket", h3, 0},
		{"HTTP/2 :protocol other than websocket", other2, errcode.MethodRefused},
		{"HTTP/3 plain", plain3, errcode.MethodRefused},
	} {
		if got := (Contract{}).Check(tt.r); got != tt.want {
			t.Errorf("%s: check = %q, want %q", tt.name, got, tt.want)
		}
	}
}

// TestInteractionIDEmpty: with Interaction, an x-fapi-interaction-id the
// caller sent empty counts as none sent (a provider wants a UUID there):
// it is replaced by a new one; a value is passed on as it is.
func TestInteractionIDEmpty(t *testing.T) {
	for _, tt := range []struct {
		sent     []string
		keptAsIs bool
	}{
		{sent: []string{""}},
		{sent: []string{"", " "}},
		{sent: []string{"93bac548-d2de-4546-b106-880a5018460d"}, keptAsIs: true},
		{sent: []string{"not-a-uuid"}, keptAsIs: true},
	} {
		r := httptest.NewRequest("GET", "/", nil)
		r.Header[InteractionIDHeader] = slices.Clone(tt.sent)
		Contract{Interaction: true}.Prepare(r, "Bearer "+testToken)
		got := r.Header[InteractionIDHeader]
		if tt.keptAsIs {
			if !slices.Equal(got, tt.sent) {
				t.Errorf("sent %q: upstream gets %q, want it unchanged", tt.sent, got)
			}
			continue
		}
		if len(got) != 1 {
			t.Errorf("sent %q: upstream gets %q, want one new UUID", tt.sent, got)
		} else if _, err := uuid.Parse(got[0]); err != nil {
			t.Errorf("sent %q: upstream gets %q, want a new UUID", tt.sent, got)
		}
	}
}
