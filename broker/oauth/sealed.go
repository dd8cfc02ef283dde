package oauth

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// Sealed keeps the records of a consent (links, authorization states,
// results) in a PendingStore for the bearers of their secrets: a record
// is JSON sealed (AES-256-GCM) with SHA-256(Domain + "seal\x00" +
// secret), under the store key "<Prefix>/<hex SHA-256(Domain + "key\x00"
// + secret)>", so that the store learns neither the secret nor the record.
type Sealed struct {
	// Store keeps the sealed records.
	Store PendingStore
	// Domain keeps the keys of one kind of record apart from another's.
	Domain string
	// Prefix starts the store keys, and names the records in errors
	// ("consent <Prefix>").
	Prefix string
}

// keys returns the store key of secret's record and the keyring that
// seals it.
func (s Sealed) keys(secret string) (string, *seal.Keyring) {
	key := sha256.Sum256([]byte(s.Domain + "key\x00" + secret))
	sk := sha256.Sum256([]byte(s.Domain + "seal\x00" + secret))
	kr, _ := seal.New(sk[:]) // a 32-byte key never fails
	return s.Prefix + "/" + hex.EncodeToString(key[:]), kr
}

// Put stores v as secret's record until expires.
func (s Sealed) Put(ctx context.Context, secret string, v any, expires time.Time) error {
	plain, err := json.Marshal(v)
	if err != nil {
		return err
	}
	key, kr := s.keys(secret)
	sealed, err := kr.Seal(plain, []byte(key))
	if err != nil {
		return fmt.Errorf("sealing the consent %s: %w", s.Prefix, err)
	}
	if err := s.Store.Put(ctx, key, sealed, expires); err != nil {
		return fmt.Errorf("storing the consent %s: %w", s.Prefix, err)
	}
	return nil
}

// Get reads secret's record into v and leaves it stored. It returns the
// store's error (wrapping ErrUnknownPending when there is none), or
// ErrUnknownPending when the record does not open.
func (s Sealed) Get(ctx context.Context, secret string, v any) error {
	return s.read(ctx, s.Store.Get, secret, v)
}

// Take is Get that also deletes the record.
func (s Sealed) Take(ctx context.Context, secret string, v any) error {
	return s.read(ctx, s.Store.Take, secret, v)
}

// read opens into v the record of secret that from returns.
func (s Sealed) read(ctx context.Context, from func(context.Context, string) ([]byte, error), secret string, v any) error {
	key, kr := s.keys(secret)
	sealed, err := from(ctx, key)
	if err != nil {
		return err
	}
	plain, err := kr.Open(sealed, []byte(key))
	if err != nil || json.Unmarshal(plain, v) != nil {
		return ErrUnknownPending
	}
	return nil
}
