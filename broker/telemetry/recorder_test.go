package telemetry

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// tap records what a Recorder's observers tell it.
type tap struct {
	mu   sync.Mutex
	told []string
}

func (t *tap) note(s string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.told = append(t.told, s)
}

func (t *tap) Fetched(provider string, b *broker.Binding, _ Holder, err error) {
	t.note(fmt.Sprintf("fetched %s %s failed=%v", provider, b.Merchant, err != nil))
}

func (t *tap) SourceChanged(_ *broker.Broker, provider, sourceID string) {
	t.note(fmt.Sprintf("source %s %s", provider, sourceID))
}

// registryOf is a registry of one provider whose source ID is id
// (name#hash, config.Provider.ID).
func registryOf(id string) *config.Registry {
	name, _, _ := strings.Cut(id, "#")
	return &config.Registry{Providers: map[string]*config.Provider{name: {Name: name, ID: id}}}
}

// TestRecorderTap: the observers of a recorder, with metrics or without,
// tell its tap what they see, with the provider's name of the source.
func TestRecorderTap(t *testing.T) {
	for _, metrics := range []*Metrics{nil, NewMetrics(false)} {
		var tp tap
		r := ForRegistry(metrics, &tp, zap.NewNop(), nil, registryOf("nuapay#1a2b"), nil)
		var o broker.Observer = &Observer{r: r}
		b := brokertest.NewBinding("nuapay#1a2b", nil, broker.Request{Merchant: "acme"})
		o.Fetched(context.Background(), b, broker.Token{}, 0, false, nil)
		o.Fetched(context.Background(), b, broker.Token{}, 0, true, &broker.APIError{Provider: "nuapay", StatusCode: 503})
		o.SourceBackingOff("nuapay#1a2b", true)
		o.BreakerChanged("other#9", broker.BreakerOpen)
		want := []string{"fetched nuapay acme failed=false", "fetched nuapay acme failed=true", "source nuapay nuapay#1a2b", "source other other#9"}
		if !slices.Equal(tp.told, want) {
			t.Errorf("metrics %v: told %q, want %q", metrics != nil, tp.told, want)
		}
	}
}

// TestRecorderKept: a 401 that says nothing about the token is logged
// with the merchant and the token's fingerprint, never the token.
func TestRecorderKept(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	r := ForRegistry(nil, nil, zap.New(core), nil, nil, nil)
	b := brokertest.NewBinding("nuapay#1a2b", nil, broker.Request{Merchant: "acme"})
	tok := broker.Token{Value: "secret-token-value"}
	r.Kept(b, tok)
	entries := logs.AllUntimed()
	if len(entries) != 1 || entries[0].Level != zap.WarnLevel {
		t.Fatalf("logs %v: want one warning", entries)
	}
	fields := entries[0].ContextMap()
	if fields["merchant"] != "acme" || fields["fingerprint"] != tok.Fingerprint() {
		t.Errorf("fields %v: want the merchant and the fingerprint", fields)
	}
	if strings.Contains(fmt.Sprint(entries[0]), tok.Value.Reveal()) {
		t.Error("the token is logged")
	}
	(*Recorder)(nil).Kept(b, tok) // a nil Recorder records nothing
}

// TestRecorderNonceRefused: a refused nonce challenge passed on is logged
// as a warning, with the provider, the merchant and the refusal, once per
// provider per NonceRefusedLogInterval; the next line says how many were
// left out.
func TestRecorderNonceRefused(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	r := ForRegistry(nil, nil, zap.New(core), nil, nil, nil)
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	r.nonceRefusals.Now = func() time.Time { return now }
	bank := brokertest.NewBinding("bank#1a2b", nil, broker.Request{Merchant: "acme"})
	other := brokertest.NewBinding("other#3c4d", nil, broker.Request{Merchant: "acme"})
	refused := &dpop.NonceError{Server: dpop.ResourceServer, Origin: "https://api.bank.example", Size: 9000}
	for _, step := range []struct {
		after      time.Duration
		b          *broker.Binding
		logged     bool
		suppressed int
	}{
		{0, bank, true, 0},
		{time.Second, bank, false, 0},
		{time.Second, other, true, 0}, // another provider has its own limit
		{NonceRefusedLogInterval - 3*time.Second, bank, false, 0},
		{time.Second, bank, true, 2},
	} {
		now = now.Add(step.after)
		before := logs.Len()
		r.NonceRefused(step.b, refused)
		entries := logs.AllUntimed()[before:]
		if !step.logged {
			if len(entries) != 0 {
				t.Fatalf("at %s for %s: %v, want the line left out", now.Format(time.TimeOnly), step.b.SourceID, entries)
			}
			continue
		}
		if len(entries) != 1 || entries[0].Level != zap.WarnLevel {
			t.Fatalf("at %s for %s: logs %v: want one warning", now.Format(time.TimeOnly), step.b.SourceID, entries)
		}
		fields := entries[0].ContextMap()
		if fields["provider"] != config.ProviderName(step.b.SourceID) || fields["merchant"] != "acme" || fields["error"] != refused.Error() {
			t.Errorf("fields %v: want the provider, the merchant and the refusal", fields)
		}
		if n, _ := fields["suppressed"].(int64); int(n) != step.suppressed {
			t.Errorf("at %s: suppressed %v, want %d", now.Format(time.TimeOnly), fields["suppressed"], step.suppressed)
		}
	}
	(*Recorder)(nil).NonceRefused(bank, refused) // a nil Recorder records nothing
}
