package kvstore

import (
	"context"
	"time"

	"go.uber.org/zap"
)

// Sweeper deletes the expired consents of a Pending every interval,
// from its start until Destruct.
type Sweeper struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// StartSweeper sweeps st now and every interval; it logs the failures,
// and the deletions at debug level, naming the storage storageID.
func StartSweeper(st Pending, interval time.Duration, logger *zap.Logger, storageID string) *Sweeper {
	ctx, cancel := context.WithCancel(context.Background())
	s := &Sweeper{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			if deleted, left, err := st.Sweep(ctx, time.Now()); err != nil && ctx.Err() == nil {
				logger.Warn("sweeping the expired consents", zap.String("storage", storageID), zap.Error(err))
			} else if deleted > 0 {
				logger.Debug("expired consents deleted", zap.Int("deleted", deleted), zap.Int("pending", left))
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// Destruct stops the sweeper, waits for a sweep under way to end and
// returns nil, so that a Sweeper can be kept in a caddy.UsagePool.
func (s *Sweeper) Destruct() error {
	s.cancel()
	<-s.done
	return nil
}
