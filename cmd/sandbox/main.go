// Command sandbox serves the sandbox provider APIs (Nuapay Gatekeeper, OneID,
// a bank's OAuth 2.0 authorization server and an echo upstream) on a local
// address for `make run` and tests.
//
//	sandbox -listen 127.0.0.1:9080 -api-key KEY -orgs org-acme,org-globex \
//	        -oneid-client id:secret -addr-file /tmp/sandbox.addr \
//	        -bank-client id:secret -bank-client-key client.pub \
//	        -bank-refresh-token "accounts payments" -state .run/sandbox \
//	        -token-rate 10 -token-burst 5 -token-rate-headers -nuapay-max-lifetime 5s
//
// The bank's issuer is the base URL the sandbox is reached at (discovery at
// /.well-known/openid-configuration), unless -bank-issuer sets it. A token
// request with a DPoP proof gets a DPoP-bound token, which the echo upstream
// accepts only with a proof of the same key (-bank-client-dpop makes the
// demo client's proofs mandatory, -dpop-nonce demands server nonces). With
// -token-rate the token endpoints together accept that many requests per
// second (429 with Retry-After above it); GET /_sandbox/token-stats
// answers their per-second counts.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

// stateFileName is the file in the -state folder that keeps the bank's
// refresh tokens.
const stateFileName = "bank-state.json"

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if err := run(); err != nil {
		log.Fatal("sandbox: ", err)
	}
}

func run() error {
	key := os.Getenv("NUAPAY_API_KEY")
	if key == "" {
		key = "sandbox-partner-key"
	}
	listen := flag.String("listen", "127.0.0.1:9080", "address to listen on (port 0 picks a free one)")
	apiKey := flag.String("api-key", key, "Nuapay partner API key accepted (default $NUAPAY_API_KEY)")
	orgs := flag.String("orgs", "org-acme,org-globex,org-initech", "comma-separated organisation ids linked to the partner")
	oneID := flag.String("oneid-client", "sandbox-oneid-client:sandbox-oneid-secret", "OneID client as id:secret")
	addrFile := flag.String("addr-file", "", "write the actual listen address to this file once listening")
	bankClient := flag.String("bank-client", "sandbox-bank-client:sandbox-bank-secret",
		"demo client of the bank's authorization server as id:secret (id: for private_key_jwt only)")
	bankKey := flag.String("bank-client-key", "", "PEM public key or certificate of the demo bank client, enabling private_key_jwt")
	bankScopes := flag.String("bank-scopes", "", "space-separated scopes the demo bank client may ask for (default any)")
	bankIssuer := flag.String("bank-issuer", "", "the bank's issuer URL (default the base URL of each request)")
	bankLifetime := flag.Duration("bank-token-lifetime", time.Hour, "expires_in of the bank's access tokens")
	bankRefresh := flag.String("bank-refresh-token", "", "print a refresh token of the demo bank client with these space-separated scopes at startup")
	bankRedirects := flag.String("bank-redirect-uris", "http://127.0.0.1:8443/consent/callback",
		"space-separated redirect URIs of the demo bank client, for the consent flow (examples/bank-consent)")
	bankDPoP := flag.Bool("bank-client-dpop", false, "the demo bank client must send a DPoP proof with each token request (DPoP-bound tokens)")
	dpopNonce := flag.Bool("dpop-nonce", false, "the bank's token endpoint and the echo upstream demand a DPoP-Nonce in DPoP proofs")
	tokenRate := flag.Float64("token-rate", 0, "token requests per second the token endpoints accept together, 429 above it (0: no limit)")
	tokenBurst := flag.Int("token-burst", 1, "token requests the token endpoints accept at once, with -token-rate")
	tokenHeaders := flag.Bool("token-rate-headers", false, "add RateLimit and X-RateLimit-* headers to token answers, with -token-rate")
	nuapayLife := flag.Duration("nuapay-max-lifetime", 0, "cap the life of Nuapay tokens, e.g. 5s (0: expiresIn as asked)")
	stateDir := flag.String("state", "", "keep the bank's refresh tokens in DIR/"+stateFileName+" across restarts (default: in memory)")
	flag.Parse()

	id, secret, ok := strings.Cut(*oneID, ":")
	if !ok || id == "" {
		return fmt.Errorf("-oneid-client %q: want id:secret", *oneID)
	}
	bc, err := demoBankClient(*bankClient, *bankKey, *bankScopes)
	if err != nil {
		return err
	}
	bc.RedirectURIs = strings.Fields(*bankRedirects)
	bc.DPoP = *bankDPoP
	if *bankLifetime < time.Second {
		return fmt.Errorf("-bank-token-lifetime %s: want at least 1s", *bankLifetime)
	}
	if *tokenRate < 0 || *tokenBurst < 1 || *nuapayLife < 0 {
		return fmt.Errorf("-token-rate %g, -token-burst %d, -nuapay-max-lifetime %s: want a rate >= 0, a burst >= 1 and a lifetime >= 0",
			*tokenRate, *tokenBurst, *nuapayLife)
	}
	cfg := sandbox.Config{APIKeys: []string{*apiKey}, OneIDClients: map[string]string{id: secret},
		BankClients: []sandbox.BankClient{bc}, BankIssuer: *bankIssuer, BankTokenLifetime: *bankLifetime,
		DPoPNonce:         *dpopNonce,
		NuapayMaxLifetime: *nuapayLife,
		TokenRateLimit:    sandbox.RateLimit{Rate: *tokenRate, Burst: *tokenBurst, Headers: *tokenHeaders}}
	for _, o := range strings.Split(*orgs, ",") {
		if o = strings.TrimSpace(o); o != "" {
			cfg.Organisations = append(cfg.Organisations, sandbox.Organisation{ID: o, Name: o, Code: strings.ToUpper(o)})
		}
	}

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	addr := ln.Addr().String()
	if *addrFile != "" {
		// Write then rename, so a reader polling the file never sees half of it.
		tmp := filepath.Join(filepath.Dir(*addrFile), "."+filepath.Base(*addrFile)+".tmp")
		if err := os.WriteFile(tmp, []byte(addr), 0o644); err != nil {
			return err
		}
		if err := os.Rename(tmp, *addrFile); err != nil {
			return err
		}
	}
	log.Printf("sandbox: listening on http://%s (%d organisations)", addr, len(cfg.Organisations))

	sb := sandbox.New(cfg)
	if *stateDir != "" {
		if err := os.MkdirAll(*stateDir, 0o700); err != nil {
			return fmt.Errorf("-state: %w", err)
		}
		if err := sb.PersistState(filepath.Join(*stateDir, stateFileName)); err != nil {
			return err
		}
		log.Printf("sandbox: state in %s", filepath.Join(*stateDir, stateFileName))
	}
	if *bankRefresh != "" {
		// On stdout, apart from the log, so that a script can capture it.
		fmt.Printf("bank refresh token for %s: %s\n", bc.ID, sb.IssueRefreshToken(bc.ID, strings.Fields(*bankRefresh)))
	}
	srv := &http.Server{Handler: logRequests(sb), ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Print("sandbox: shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return err
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// demoBankClient builds the demo bank client from the flags.
func demoBankClient(idSecret, keyFile, scopes string) (sandbox.BankClient, error) {
	id, secret, ok := strings.Cut(idSecret, ":")
	if !ok || id == "" {
		return sandbox.BankClient{}, fmt.Errorf("-bank-client %q: want id:secret, or id: with -bank-client-key (private_key_jwt)", idSecret)
	}
	c := sandbox.BankClient{ID: id, Secret: secret, Scopes: strings.Fields(scopes)}
	if keyFile != "" {
		b, err := os.ReadFile(keyFile)
		if err != nil {
			return c, fmt.Errorf("-bank-client-key: %w", err)
		}
		if _, err := sandbox.ParsePublicKey(b); err != nil {
			return c, fmt.Errorf("-bank-client-key %s: %w", keyFile, err)
		}
		c.PublicKeyPEM = b
	}
	if c.Secret == "" && c.PublicKeyPEM == nil {
		return c, fmt.Errorf("-bank-client %q has no secret and no -bank-client-key: it could not authenticate", idSecret)
	}
	return c, nil
}

// statusWriter records the status code written.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// logRequests logs method, escaped path and status of each request; never
// headers, query strings or bodies, which may carry credentials.
func logRequests(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		h.ServeHTTP(sw, r)
		if sw.status == 0 {
			sw.status = http.StatusOK
		}
		log.Printf("%s %s %d %s", r.Method, r.URL.EscapedPath(), sw.status, time.Since(start).Round(time.Microsecond))
	})
}
