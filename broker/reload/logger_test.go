package reload

import (
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestLoggerFollowsSwap: a kept object's logger (Zap, named and with
// fields as the object made it) writes each entry through the logger last
// swapped in, with that logger's name and level, and no longer through the
// one before.
func TestLoggerFollowsSwap(t *testing.T) {
	firstCore, first := observer.New(zapcore.InfoLevel)
	nextCore, next := observer.New(zapcore.WarnLevel)
	kept := NewLogger(zap.New(firstCore).Named("token_broker"))
	z := kept.Zap().Named("redis").With(zap.String("k", "v"))

	z.Info("before the reload")
	kept.Swap(zap.New(nextCore).Named("token_broker").With(zap.String("config", "next")))
	if z.Core().Enabled(zapcore.InfoLevel) {
		t.Error("info enabled after the Swap of a logger at warn")
	}
	z.Info("after the reload, below the level")
	z.Warn("after the reload")

	for _, tt := range []struct {
		name string
		logs *observer.ObservedLogs
		want []string // messages
		ctx  map[string]any
	}{
		{"first", first, []string{"before the reload"}, map[string]any{"k": "v"}},
		{"next", next, []string{"after the reload"}, map[string]any{"k": "v", "config": "next"}},
	} {
		got := tt.logs.All()
		if len(got) != len(tt.want) {
			t.Fatalf("%s logger: %d entries %v, want %q", tt.name, len(got), got, tt.want)
		}
		for i, e := range got {
			if e.Message != tt.want[i] || e.LoggerName != "token_broker.redis" {
				t.Errorf("%s logger: entry %q of %q, want %q of token_broker.redis", tt.name, e.Message, e.LoggerName, tt.want[i])
			}
			for k, v := range tt.ctx {
				if e.ContextMap()[k] != v {
					t.Errorf("%s logger: entry %q has %s=%v, want %v", tt.name, e.Message, k, e.ContextMap()[k], v)
				}
			}
		}
	}
}

// TestLoggerUnnamed: an entry of Zap itself takes the current logger's
// name; with an unnamed current logger, the name Zap's user gave.
func TestLoggerUnnamed(t *testing.T) {
	for _, tt := range []struct {
		current, named, want string
	}{
		{"token_broker", "", "token_broker"},
		{"", "listing", "listing"},
		{"", "", ""},
	} {
		core, logs := observer.New(zapcore.InfoLevel)
		z := NewLogger(zap.New(core).Named(tt.current)).Zap()
		if tt.named != "" {
			z = z.Named(tt.named)
		}
		z.Info("m")
		if got := logs.All(); len(got) != 1 || got[0].LoggerName != tt.want {
			t.Errorf("current %q, named %q: entries %v, want one of %q", tt.current, tt.named, got, tt.want)
		}
	}
}

// TestLoggerCompareAndSwap: a config that stops hands the logger back to
// the one its start replaced only while its own is the current one: not
// once a later config has started.
func TestLoggerCompareAndSwap(t *testing.T) {
	cores := map[string]*observer.ObservedLogs{}
	loggers := map[string]*zap.Logger{}
	for _, name := range []string{"a", "b", "c"} {
		core, logs := observer.New(zapcore.InfoLevel)
		cores[name], loggers[name] = logs, zap.New(core)
	}
	kept := NewLogger(zap.NewNop())
	z := kept.Zap()
	kept.Swap(loggers["a"])
	beforeB := kept.Swap(loggers["b"])
	beforeC := kept.Swap(loggers["c"])
	if kept.CompareAndSwap(loggers["b"], beforeB) {
		t.Error("b stopping after c started swapped the logger back")
	}
	z.Info("c runs")
	if !kept.CompareAndSwap(loggers["c"], beforeC) {
		t.Error("c stopping while current did not swap the logger back")
	}
	z.Info("b runs again")
	for name, want := range map[string]int{"a": 0, "b": 1, "c": 1} {
		if n := cores[name].Len(); n != want {
			t.Errorf("logger %s has %d entries, want %d", name, n, want)
		}
	}
}
