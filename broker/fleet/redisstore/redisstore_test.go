package redisstore

import (
	"context"
	"encoding/base64"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
)

// The bounds of Redis calls: defaults within the fetch timeout, and the
// client's own timeouts at the longest bound.
func TestPrepareTimeouts(t *testing.T) {
	key := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))
	tests := []struct {
		name              string
		timeout, max, fto time.Duration
		wantTimeout       time.Duration
		wantMax           time.Duration
	}{
		{name: "defaults", wantTimeout: fleet.DefaultTimeout, wantMax: fleet.DefaultMaxTimeout},
		{name: "a short fetch timeout caps the default", fto: 4 * time.Second, wantTimeout: fleet.DefaultTimeout, wantMax: time.Second},
		{name: "a long timeout raises the default", timeout: 3 * time.Second, wantTimeout: 3 * time.Second, wantMax: 3 * time.Second},
		{name: "set", timeout: 10 * time.Millisecond, max: 500 * time.Millisecond, wantTimeout: 10 * time.Millisecond, wantMax: 500 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Prepare(Settings{Address: []string{"127.0.0.1:1"}, EncryptionKey: key, Timeout: tt.timeout, MaxTimeout: tt.max, FetchTimeout: tt.fto})
			if err != nil {
				t.Fatal(err)
			}
			if p.Timeout != tt.wantTimeout || p.MaxTimeout != tt.wantMax {
				t.Fatalf("timeout %s, max %s; want %s, %s", p.Timeout, p.MaxTimeout, tt.wantTimeout, tt.wantMax)
			}
			if p.opts.ReadTimeout != tt.wantMax || p.opts.PoolTimeout != tt.wantMax || p.opts.DialerRetries != 1 {
				t.Fatalf("client read timeout %s, pool timeout %s, dial retries %d; want %s, %s, 1", p.opts.ReadTimeout, p.opts.PoolTimeout, p.opts.DialerRetries, tt.wantMax, tt.wantMax)
			}
		})
	}
}

// Destruct closes the tier and its client: the client answers no more
// calls.
func TestTierDestructCloses(t *testing.T) {
	r := redistest.Start(t)
	key := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))
	p, err := Prepare(Settings{Address: []string{r.Addr()}, EncryptionKey: key})
	if err != nil {
		t.Fatal(err)
	}
	tier, err := p.Open(zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	if err := tier.Cache.Client().Ping(context.Background()).Err(); err != nil {
		t.Fatalf("ping before Destruct: %v", err)
	}
	if err := tier.Destruct(); err != nil {
		t.Fatalf("Destruct: %v", err)
	}
	if err := tier.Cache.Client().Ping(context.Background()).Err(); !errors.Is(err, redis.ErrClosed) {
		t.Fatalf("ping after Destruct: %v, want %v", err, redis.ErrClosed)
	}
}
