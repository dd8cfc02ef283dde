package module

import (
	"context"
	"slices"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestKeptLoggerAcrossReloads: an object kept across reloads (the pooled
// broker) logs through the logger of the config that runs. A reload whose
// app started but which Caddy then stopped (a later app failed to start,
// the old config runs on) gives the logger back to the old config; the
// next good reload's app takes it over, and is the one logged through,
// also while it stops at shutdown (the old configs are gone by then).
func TestKeptLoggerAcrossReloads(t *testing.T) {
	prev := current.Load()
	t.Cleanup(func() { current.Store(prev) })
	logs := map[string]*observer.ObservedLogs{}
	cleaned := map[*App]bool{}
	cleanup := func(app *App) {
		t.Helper()
		if !cleaned[app] {
			cleaned[app] = true
			if err := app.Cleanup(); err != nil {
				t.Fatal(err)
			}
		}
	}
	provision := func(name string) *App {
		t.Helper()
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		t.Cleanup(cancel)
		app := &App{}
		if err := app.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cleanup(app) })
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
	if current.Load() != a {
		t.Error("after b stopped, a is not the current app again")
	}
	cleanup(b)
	kept.Info("a runs again")
	c := provision("c")
	run(c.Start)
	run(a.Stop)
	cleanup(a)
	kept.Info("c runs")
	run(c.Stop) // shutdown: no config runs before c any more
	kept.Info("c stops")
	if current.Load() != nil {
		t.Error("after the last app stopped, an app is still current")
	}

	if a.kept != b.kept || b.kept != c.kept || c.pooled.Logger != kept {
		t.Fatal("the configs do not share one kept objects' logger and broker")
	}
	for name, want := range map[string][]string{"a": {"a runs again"}, "b": {"b runs"}, "c": {"c runs", "c stops"}} {
		var got []string
		for _, e := range logs[name].All() {
			got = append(got, e.Message)
		}
		if !slices.Equal(got, want) {
			t.Errorf("config %s's logger has %q, want %q", name, got, want)
		}
	}
}
