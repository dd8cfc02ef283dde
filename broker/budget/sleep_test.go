package budget

import (
	"context"
	"time"
)

// WithSleep replaces the timer a waiting caller sleeps on (tests move a
// fake clock in it). sleep returns early with ctx's error when ctx ends.
func WithSleep(sleep func(ctx context.Context, d time.Duration) error) Option {
	return func(b *Budget) { b.sleep = sleep }
}
