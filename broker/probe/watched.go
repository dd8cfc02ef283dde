package probe

import (
	"slices"
	"sync"

	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// Watched are registries that a health answer covers besides an app's
// own: those that handlers loaded themselves, each with its organisation
// listing (nil when not restricted). The zero value is empty; it is safe
// for concurrent use and must not be copied.
type Watched struct {
	mu   sync.Mutex
	regs []watchedRegistry
}

// watchedRegistry is a watched registry and its listing.
type watchedRegistry struct {
	reg     *config.Registry
	listing *listing.Listing
}

// Add watches reg with its listing l (nil: not restricted), once.
func (w *Watched) Add(reg *config.Registry, l *listing.Listing) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !slices.ContainsFunc(w.regs, func(r watchedRegistry) bool { return r.reg == reg }) {
		w.regs = append(w.regs, watchedRegistry{reg: reg, listing: l})
	}
}

// Registries are the watched registries, in the order added, with their
// listings' state now; none for a nil Watched.
func (w *Watched) Registries() []Registry {
	if w == nil {
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]Registry, 0, len(w.regs))
	for _, r := range w.regs {
		out = append(out, Of(r.reg, r.listing))
	}
	return out
}

// Of is the Registry of reg with its organisation listing l (nil: not
// restricted), in its state now.
func Of(reg *config.Registry, l *listing.Listing) Registry {
	pr := Registry{Registry: reg}
	if l != nil {
		pr.Listing = &Listing{Provider: l.Provider(), Status: l.Status()}
	}
	return pr
}
