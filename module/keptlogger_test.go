package module

import (
	"context"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestKeptLoggerAcrossReloads: an object kept across reloads (the pooled
// broker) logs through the logger of the config that runs. A reload whose
// app started but which Caddy then stopped (a later app failed to start,
// the old config runs on) gives the logger back to the old config; the
// next good reload's app takes it over, and is the one logged through.
func TestKeptLoggerAcrossReloads(t *testing.T) {
	prev := current.Load()
	t.Cleanup(func() { current.Store(prev) })
	logs := map[string]*observer.ObservedLogs{}
	provision := func(name string) *App {
		t.Helper()
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		t.Cleanup(cancel)
		app := &App{}
		if err := app.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = app.Cleanup() })
		core, observed := observer.New(zap.InfoLevel)
		app.logger, logs[name] = zap.New(core), observed // the config's own logger, as its logging makes it
		return app
	}
	run := func(step func() error) {
		t.Helper()
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	a := provision("a")
	run(a.Start)
	kept := a.pooled.Logger
	b := provision("b")
	run(b.Start)
	kept.Info("b runs")
	run(b.Stop) // a later app of b's config failed: Caddy stops b, a runs on
	kept.Info("a runs again")
	c := provision("c")
	run(c.Start)
	run(a.Stop)
	kept.Info("c runs")

	if a.kept != b.kept || b.kept != c.kept || c.pooled.Logger != kept {
		t.Fatal("the configs do not share one kept objects' logger and broker")
	}
	for name, want := range map[string]string{"a": "a runs again", "b": "b runs", "c": "c runs"} {
		if got := logs[name].All(); len(got) != 1 || got[0].Message != want {
			t.Errorf("config %s's logger has %v, want only %q", name, got, want)
		}
	}
}
