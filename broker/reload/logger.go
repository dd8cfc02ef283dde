package reload

import (
	"slices"
	"sync/atomic"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Logger is the logger of objects kept across config reloads (a broker, a
// shared tier, an organisation listing, a sweeper): Zap writes each entry
// through the current logger (Swap, CompareAndSwap), the running
// config's, since a reload closes the logger of the config before. The
// entries take that logger's name, levels, fields and sinks, not its
// caller or stack trace options. Safe for concurrent use.
type Logger struct {
	current atomic.Pointer[zap.Logger]
	zap     *zap.Logger
}

// NewLogger returns a Logger that writes through logger until another is
// swapped in.
func NewLogger(logger *zap.Logger) *Logger {
	l := &Logger{}
	l.current.Store(logger)
	l.zap = zap.New(followCore{l: l})
	return l
}

// Swap makes logger the current one and returns the one before.
func (l *Logger) Swap(logger *zap.Logger) *zap.Logger { return l.current.Swap(logger) }

// CompareAndSwap makes next the current logger if it is still old, and
// reports whether it did.
func (l *Logger) CompareAndSwap(old, next *zap.Logger) bool {
	return l.current.CompareAndSwap(old, next)
}

// Destruct implements caddy.Destructor: the Logger holds nothing to
// release.
func (l *Logger) Destruct() error { return nil }

// Zap returns the *zap.Logger to give kept objects. Its entries are named
// after the current logger, then the names given with Named.
func (l *Logger) Zap() *zap.Logger { return l.zap }

// followCore is the zapcore.Core of Logger.Zap: the current logger's
// core, with the fields given to With.
type followCore struct {
	l      *Logger
	fields []zapcore.Field
}

func (c followCore) core() (zapcore.Core, string) {
	cur := c.l.current.Load()
	core := cur.Core()
	if len(c.fields) > 0 {
		core = core.With(c.fields)
	}
	return core, cur.Name()
}

// Enabled reports whether the current logger logs at level.
func (c followCore) Enabled(level zapcore.Level) bool {
	return c.l.current.Load().Core().Enabled(level)
}

// With returns a core that adds fields to each entry.
func (c followCore) With(fields []zapcore.Field) zapcore.Core {
	return followCore{l: c.l, fields: append(slices.Clip(c.fields), fields...)}
}

// Check hands the entry, under the current logger's name, to the current
// logger's core.
func (c followCore) Check(ent zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	core, name := c.core()
	switch {
	case ent.LoggerName == "":
		ent.LoggerName = name
	case name != "":
		ent.LoggerName = name + "." + ent.LoggerName
	}
	return core.Check(ent, ce)
}

// Write writes the entry with the current logger's core (only a caller
// of Write without Check gets here).
func (c followCore) Write(ent zapcore.Entry, fields []zapcore.Field) error {
	core, _ := c.core()
	return core.Write(ent, fields)
}

// Sync flushes the current logger.
func (c followCore) Sync() error { return c.l.current.Load().Sync() }
