package oauth

import (
	"context"
	"encoding/base64"
	"reflect"
	"testing"
	"time"
)

// TestPendingsFixedVector: the store key and the sealing of consent links
// and authorization states are fixed, so that the sidecars of a fleet
// being upgraded open each other's records: a record sealed by this
// version (the literal below) opens, and a record stored now lands under
// the literal key.
func TestPendingsFixedVector(t *testing.T) {
	const secret = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
	expires := time.Unix(4_102_444_800, 0).UTC()
	for _, tt := range []struct {
		kind, key, sealed string
		rec               Pending
	}{
		{kindLink, "link/e268e1a26c5f4ec0ec9137099c038f1c3a618b694fe9f0a606021540536eef19",
			"AQAKRrqkvcVpQghps9aFFmqjyj6Z5kHK/aAOR4Jlzlx8ofDfbwif2z7sH/dKH2d+B2Tb6nIAGhd+AkDLLxh12rott2FZm2rHnas6XJUfdwUMzRCcvwZWFTnqr94eacFNWeLyHbDa2mTB8EL4cMUR6gsgf4I0sA5TtrrxUjYKmgxZ9csGrw==",
			Pending{Provider: "bank", Merchant: "acme", RedirectURI: "https://cb.partner.example/consent/callback", Expires: expires}},
		{kindState, "state/d8cf4b5d352dc61268b46d032ef0b09be97990bf6a6d834d8eb019b0b39a3960",
			"Af0KRqc4aQUZH2B7gDBGOuDyzzv+sQj63r9uRspiEsNDSgmeQS6t7MTpQDPUR9CmUFdgFMGBXQFL8SyN/JGTkH8+vta/CuSb1H03PW5Mz+gui5+KqTwfZXG/h/3Cl8Cl+eUEBWuYrcTdwPpWHvbe9OvP3vlPZpm6H6pMQywmESzI/t37ymzPBllnQ1ofdE0P3KZnsMFYT0+urVu8L12r8w==",
			Pending{Provider: "bank", Merchant: "acme", RedirectURI: "https://cb.partner.example/consent/callback", Verifier: "verifier", Nonce: "nonce", Expires: expires}},
	} {
		t.Run(tt.kind, func(t *testing.T) {
			ctx := context.Background()
			store := &MemoryPendingStore{}
			p := &Pendings{Store: store, Now: func() time.Time { return time.Unix(1_700_000_000, 0) }}
			sealed, err := base64.StdEncoding.DecodeString(tt.sealed)
			if err != nil {
				t.Fatal(err)
			}
			if err := store.Put(ctx, tt.key, sealed, expires); err != nil {
				t.Fatal(err)
			}
			rec, err := p.take(ctx, tt.kind, secret)
			if err != nil || !reflect.DeepEqual(rec, tt.rec) {
				t.Fatalf("the record sealed by this version: %+v, %v; want %+v", rec, err, tt.rec)
			}
			if err := p.put(ctx, tt.kind, secret, tt.rec); err != nil {
				t.Fatal(err)
			}
			if _, err := store.Get(ctx, tt.key); err != nil {
				t.Fatalf("the record stored now is not under %s: %v", tt.key, err)
			}
		})
	}
}
