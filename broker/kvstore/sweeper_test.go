package kvstore

import (
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// Destruct stops the sweeper: its goroutine has ended when Destruct
// returns.
func TestSweeperDestructStops(t *testing.T) {
	s := StartSweeper(Pending{S: &certmagic.FileStorage{Path: t.TempDir()}}, time.Hour, zap.NewNop(), "test")
	if err := s.Destruct(); err != nil {
		t.Fatalf("Destruct: %v", err)
	}
	select {
	case <-s.done:
	default:
		t.Fatal("the sweeper still runs after Destruct")
	}
}
