package redisstore

import (
	"context"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
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

// A plan's key follows the content of the TLS files it reads, not only
// their paths: a reload after a CA bundle, a client certificate or its key
// was replaced opens a new tier with them, and a reload that changed
// nothing keeps the tier.
func TestPrepareKeyFollowsTLSFiles(t *testing.T) {
	srv := httptest.NewTLSServer(nil)
	defer srv.Close()
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	keyDER, err := x509.MarshalPKCS8PrivateKey(srv.TLS.Certificates[0].PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	dir := t.TempDir()
	files := &TLS{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, "cert.pem"), Key: filepath.Join(dir, "key.pem")}
	write := func(name string, b []byte) {
		t.Helper()
		if err := os.WriteFile(name, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(files.CA, certPEM)
	write(files.Cert, certPEM)
	write(files.Key, keyPEM)
	encryptionKey := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))
	planKey := func() string {
		t.Helper()
		p, err := Prepare(Settings{Address: []string{"127.0.0.1:1"}, EncryptionKey: encryptionKey, TLS: files})
		if err != nil {
			t.Fatal(err)
		}
		return p.Key
	}
	last := planKey()
	if again := planKey(); again != last {
		t.Fatalf("the same settings and files gave two keys: %s, %s", last, again)
	}
	tests := []struct {
		name string
		file string
		data []byte
	}{
		{name: "CA bundle with one more certificate", file: files.CA, data: append(slices.Clone(certPEM), certPEM...)},
		{name: "client certificate with its chain", file: files.Cert, data: append(slices.Clone(certPEM), certPEM...)},
		{name: "client key as PKCS#1", file: files.Key, data: pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY",
			Bytes: x509.MarshalPKCS1PrivateKey(srv.TLS.Certificates[0].PrivateKey.(*rsa.PrivateKey))})},
	}
	for _, tt := range tests {
		write(tt.file, tt.data)
		if got := planKey(); got == last {
			t.Errorf("%s: the plan's key did not change (a reload would keep the tier with the old TLS files)", tt.name)
		} else {
			last = got
		}
	}
}

// The tls settings: the bare flag connects with TLS and the system roots,
// a server name and a CA bundle are used, a certificate needs its key, and
// a file that cannot be read is named in the error.
func TestTLSConfig(t *testing.T) {
	srv := httptest.NewTLSServer(nil)
	defer srv.Close()
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		tls      TLS
		wantRoot bool
		wantErr  string
	}{
		{name: "bare flag"},
		{name: "server name and CA", tls: TLS{ServerName: "redis.internal", CA: ca}, wantRoot: true},
		{name: "cert without key", tls: TLS{Cert: "/c.pem"}, wantErr: "tls cert and key go together"},
		{name: "missing CA", tls: TLS{CA: "/nonexistent/ca.pem"}, wantErr: "tls: CA bundle: open /nonexistent/ca.pem"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := tt.tls.config()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("config() error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg == nil || cfg.MinVersion != tls.VersionTLS12 || cfg.ServerName != tt.tls.ServerName || (cfg.RootCAs != nil) != tt.wantRoot {
				t.Fatalf("config() = %+v; want TLS 1.2 at least, server name %q, own roots %v", cfg, tt.tls.ServerName, tt.wantRoot)
			}
		})
	}
}

// Settings the client could only fail on at every call are refused when
// the config loads, with the setting named: an address that is not
// host:port (a URL, no port), a negative database, a database other than
// 0 on a cluster.
func TestPrepareRejectsUnusableSettings(t *testing.T) {
	key := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))
	tests := []struct {
		name    string
		s       Settings
		wantErr string
	}{
		{name: "URL", s: Settings{Address: []string{"redis://redis.internal:6379"}}, wantErr: `address "redis://redis.internal:6379": want host:port`},
		{name: "TLS URL", s: Settings{Address: []string{"rediss://redis.internal:6380"}}, wantErr: `address "rediss://redis.internal:6380": want host:port`},
		{name: "URL with credentials", s: Settings{Address: []string{"redis://broker:s3cret-pw@redis.internal:6379/0"}}, wantErr: `address "xxxxx@redis.internal:6379/0": want host:port`},
		{name: "credentials without a scheme", s: Settings{Address: []string{"default:s3cret@redis:6379"}}, wantErr: `address "xxxxx@redis:6379": want host:port`},
		{name: "password before the host", s: Settings{Address: []string{"s3cret@redis"}}, wantErr: `address "xxxxx@redis": want host:port`},
		{name: "password before host:port", s: Settings{Address: []string{"s3cret@redis:6379"}}, wantErr: `address "xxxxx@redis:6379": want host:port`},
		{name: "password holding @", s: Settings{Address: []string{"redis://default:s3@cret@redis:6379"}}, wantErr: `address "xxxxx@redis:6379": want host:port`},
		{name: "password in the query", s: Settings{Address: []string{"redis://redis:6379?password=s3cret"}}, wantErr: `address "redis://redis:6379": want host:port`},
		{name: "password in the fragment", s: Settings{Address: []string{"redis:6379#s3cret"}}, wantErr: `address "redis:6379": want host:port`},
		{name: "no port", s: Settings{Address: []string{"redis.internal"}}, wantErr: `address "redis.internal": want host:port`},
		{name: "port out of range", s: Settings{Address: []string{"redis.internal:70000"}}, wantErr: `address "redis.internal:70000": want host:port`},
		{name: "one bad node of a cluster", s: Settings{Address: []string{"10.0.0.1:6379", "10.0.0.2"}}, wantErr: `address "10.0.0.2"`},
		{name: "unix socket among several", s: Settings{Address: []string{"/run/redis/redis.sock", "10.0.0.2:6379"}}, wantErr: `address "/run/redis/redis.sock": want host:port`},
		{name: "negative db", s: Settings{Address: []string{"redis.internal:6379"}, DB: -1}, wantErr: "db -1"},
		{name: "db on a cluster", s: Settings{Address: []string{"10.0.0.1:6379", "10.0.0.2:6379"}, DB: 2}, wantErr: "db 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.s.EncryptionKey = key
			_, err := Prepare(tt.s)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Prepare error %v, want %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "s3cret") {
				t.Fatalf("Prepare error %q shows the password", err)
			}
		})
	}
	for _, s := range []Settings{
		{Address: []string{"[::1]:6379"}, DB: 3},
		{Address: []string{"10.0.0.1:26379", "10.0.0.2:26379"}, MasterName: "mymaster", DB: 1},
	} {
		s.EncryptionKey = key
		if _, err := Prepare(s); err != nil {
			t.Errorf("Prepare(%v, db %d): %v", s.Address, s.DB, err)
		}
	}
}

// A unix socket's path, the only address, is a server the tier reaches
// (go-redis dials an address starting with "/" as a unix socket).
func TestUnixSocketAddress(t *testing.T) {
	r := redistest.StartSocket(t)
	key := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))
	p, err := Prepare(Settings{Address: []string{r.Socket()}, EncryptionKey: key, DB: 1})
	if err != nil {
		t.Fatal(err)
	}
	tier, err := p.Open(zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tier.Destruct() })
	if err := tier.Cache.Client().Set(context.Background(), "probe", "over the socket", 0).Err(); err != nil {
		t.Fatalf("SET over %s: %v", r.Socket(), err)
	}
	if got := r.CLI("-n", "1", "GET", "probe"); strings.TrimSpace(got) != "over the socket" {
		t.Fatalf("GET probe in db 1 = %q, want the value set over the socket", got)
	}
}
