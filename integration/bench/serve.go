package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

// tokenCountPath answers the token API's count of token requests.
const tokenCountPath = "/_bench/token-requests"

// serveHelper runs the driver as one of its helper processes:
//
//	bench upstream -addr-file F          a minimal upstream: 200 "ok\n", no log
//	bench tokenapi -addr-file F -orgs N  the sandbox's Nuapay Gatekeeper with
//	  [-merchant-orgs M]                 N organisations (orgFormat) and M
//	  [-bank-client ID]                  named like merchant ids (the
//	                                     wildcard case), API key from
//	                                     $BENCH_NUAPAY_API_KEY, and its bank
//	                                     with the client ID (secret
//	                                     $BENCH_BANK_SECRET; DPoP or bearer
//	                                     tokens), no log
//	  [-rate R -burst B]                 named like merchant ids (the
//	                                     wildcard case), API key from
//	                                     $BENCH_NUAPAY_API_KEY, no log; with
//	                                     -rate, 429 above R token requests
//	                                     per second (burst B), statistics at
//	                                     sandbox.TokenStatsPath
//
// Both listen on 127.0.0.1:0, write the address to the file, and stop on
// SIGTERM. bin/sandbox is not used for the token API: its -orgs flag cannot
// carry 100 000 ids (one argument is limited to 128 KiB) and it logs every
// request; this process serves the same sandbox package.
func serveHelper(kind string, args []string) error {
	fs := flag.NewFlagSet(kind, flag.ContinueOnError)
	addrFile := fs.String("addr-file", "", "write the listen address to this file once listening")
	orgs := fs.Int("orgs", 0, "tokenapi: organisations linked to the partner")
	merchantOrgs := fs.Int("merchant-orgs", 0, "tokenapi: more organisations, named like the merchant ids (the wildcard case)")
	bankClient := fs.String("bank-client", "", "tokenapi: a client of the sandbox bank, secret from $"+bankSecretEnv)
	rate := fs.Float64("rate", 0, "tokenapi: token requests per second accepted, 429 above (0: no limit)")
	burst := fs.Int("burst", 1, "tokenapi: token requests accepted at once, with -rate")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var h http.Handler
	switch kind {
	case "upstream":
		h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			w.Header().Set("Content-Type", "text/plain")
			w.Write([]byte("ok\n"))
		})
	case "tokenapi":
		key := os.Getenv(apiKeyEnv)
		if key == "" {
			return fmt.Errorf("tokenapi: $%s is empty: set the partner API key the token API accepts", apiKeyEnv)
		}
		cfg := sandbox.Config{APIKeys: []string{key}, Organisations: make([]sandbox.Organisation, *orgs, *orgs+*merchantOrgs),
			TokenRateLimit: sandbox.RateLimit{Rate: *rate, Burst: *burst}}
		for i := range cfg.Organisations {
			cfg.Organisations[i] = sandbox.Organisation{ID: orgID(i)}
		}
		for i := range *merchantOrgs {
			cfg.Organisations = append(cfg.Organisations, sandbox.Organisation{ID: merchantID(i)})
		}
		if *bankClient != "" {
			cfg.BankClients = []sandbox.BankClient{{ID: *bankClient, Secret: os.Getenv(bankSecretEnv)}}
		}
		sb := sandbox.New(cfg)
		mux := http.NewServeMux()
		mux.Handle("/", sb)
		mux.HandleFunc(tokenCountPath, func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintln(w, sb.TokenRequests())
		})
		h = mux
	default:
		return fmt.Errorf("unknown helper %q: want upstream or tokenapi", kind)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	if *addrFile != "" {
		// Write then rename, so that a reader polling the file never sees half of it.
		tmp := filepath.Join(filepath.Dir(*addrFile), "."+filepath.Base(*addrFile)+".tmp")
		if err := os.WriteFile(tmp, []byte(ln.Addr().String()), 0o644); err != nil {
			return err
		}
		if err := os.Rename(tmp, *addrFile); err != nil {
			return err
		}
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		return err
	}
	return nil
}

// parseCount reads the integer the token API's count endpoint answers.
func parseCount(body string) (int64, error) {
	n, err := strconv.ParseInt(strings.TrimSpace(body), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("token API count %q is not an integer", body)
	}
	return n, nil
}
