package seal

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

func testKey(b byte) []byte { return bytes.Repeat([]byte{b}, KeySize) }

func TestSealOpen(t *testing.T) {
	a, err := New(testKey(1))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := New(testKey(2))
	rotated, _ := New(testKey(2), testKey(1)) // new key B, old key A
	sealed, err := a.Seal([]byte("the-token"), []byte("key-1"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, []byte("the-token")) {
		t.Fatal("sealed value contains the plaintext")
	}
	tampered := append([]byte(nil), sealed...)
	tampered[len(tampered)-1] ^= 1
	tests := []struct {
		name    string
		kr      *Keyring
		sealed  []byte
		ad      string
		want    string
		wantErr error
	}{
		{name: "same key and ad", kr: a, sealed: sealed, ad: "key-1", want: "the-token"},
		{name: "other ad (value moved to another key)", kr: a, sealed: sealed, ad: "key-2", wantErr: ErrOpen},
		{name: "other key", kr: b, sealed: sealed, ad: "key-1", wantErr: ErrUnknownKey},
		{name: "rotated: old key still opens", kr: rotated, sealed: sealed, ad: "key-1", want: "the-token"},
		{name: "tampered", kr: a, sealed: tampered, ad: "key-1", wantErr: ErrOpen},
		{name: "not sealed", kr: a, sealed: []byte("the-token"), ad: "key-1", wantErr: ErrMalformed},
		{name: "empty", kr: a, sealed: nil, ad: "key-1", wantErr: ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.kr.Open(tt.sealed, []byte(tt.ad))
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Open error = %v; want %v", err, tt.wantErr)
			}
			if string(got) != tt.want {
				t.Fatalf("Open = %q; want %q", got, tt.want)
			}
		})
	}
}

func TestRotationSealsWithNewKey(t *testing.T) {
	a, _ := New(testKey(1))
	rotated, _ := New(testKey(2), testKey(1))
	b, _ := New(testKey(2))
	sealed, err := rotated.Seal([]byte("v"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Open(sealed, nil); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("old key alone opened a value sealed after rotation: %v", err)
	}
	if got, err := b.Open(sealed, nil); err != nil || string(got) != "v" {
		t.Fatalf("new key: %q, %v", got, err)
	}
	if d := rotated.Derive("names"); len(d) != 2 || bytes.Equal(d[0], d[1]) || bytes.Equal(d[0], testKey(2)) {
		t.Fatal("Derive: want one distinct subkey per key, not the key itself")
	}
}

func TestSealUsesFreshNonces(t *testing.T) {
	a, _ := New(testKey(1))
	x, _ := a.Seal([]byte("v"), nil)
	y, _ := a.Seal([]byte("v"), nil)
	if bytes.Equal(x, y) {
		t.Fatal("two seals of one value are equal: the nonce is not random")
	}
}

func TestKeys(t *testing.T) {
	secret := base64.StdEncoding.EncodeToString(testKey(7))
	tests := []struct {
		name, in string
		wantErr  string
	}{
		{name: "std", in: secret},
		{name: "with newline, as in a file", in: secret + "\n"},
		{name: "raw url", in: base64.RawURLEncoding.EncodeToString(testKey(7))},
		{name: "short", in: base64.StdEncoding.EncodeToString(testKey(7)[:16]), wantErr: "16 bytes; want 32"},
		{name: "not base64", in: "not base64!" + secret, wantErr: "not valid base64"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := ParseKey(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseKey error = %v; want %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), secret) {
					t.Fatal("the error reveals the key")
				}
				return
			}
			if err != nil || !bytes.Equal(k, testKey(7)) {
				t.Fatalf("ParseKey = %x, %v", k, err)
			}
		})
	}
	if _, err := New(testKey(1), testKey(2)[:5]); err == nil || !strings.Contains(err.Error(), "old encryption key 1 is 5 bytes") {
		t.Fatalf("New with a short old key: %v", err)
	}
}

func TestParseKeyring(t *testing.T) {
	good := base64.StdEncoding.EncodeToString(testKey(7))
	short := base64.StdEncoding.EncodeToString(testKey(7)[:16])
	env := map[string]string{"{env.K}": good, "{env.SHORT}": short}
	resolve := func(v string) (string, error) {
		if strings.HasPrefix(v, "{") {
			if r, ok := env[v]; ok {
				return r, nil
			}
			return "", errors.New("not set")
		}
		return v, nil
	}
	tests := []struct {
		name    string
		current string
		old     []string
		wantErr string
	}{
		{name: "current and old, resolved", current: "{env.K}", old: []string{good}},
		{name: "none"},
		{name: "no current", old: []string{good}, wantErr: "key is required: 32 random bytes"},
		{name: "short current", current: "{env.SHORT}", wantErr: "key: seal: the key decodes to 16 bytes; want 32"},
		{name: "second old key short", current: good, old: []string{good, "{env.SHORT}"}, wantErr: "keys_old[1]: seal: the key decodes to 16 bytes"},
		{name: "unresolved old key", current: good, old: []string{"{env.NONE}"}, wantErr: "keys_old[0]: not set"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kr, err := ParseKeyring("key", tt.current, "keys_old", tt.old, resolve)
			if tt.current == "" && tt.old == nil {
				if kr != nil || err != nil {
					t.Fatalf("ParseKeyring without keys = %v, %v; want nil, nil", kr, err)
				}
				return
			}
			if tt.wantErr == "" {
				if err != nil || len(kr.keys) != 1+len(tt.old) || !bytes.Equal(kr.keys[0].raw, testKey(7)) {
					t.Fatalf("ParseKeyring = %v, %v", kr, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ParseKeyring error = %v; want %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), good) || strings.Contains(err.Error(), short) {
				t.Fatal("the error reveals a key")
			}
		})
	}
}

func TestIsSealedAndFingerprint(t *testing.T) {
	a, _ := New(testKey(1))
	sealed, err := a.Seal([]byte("rt"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !IsSealed(sealed) || IsSealed([]byte("rt-in-clear")) || IsSealed(nil) {
		t.Fatal("IsSealed: want true only for a sealed value")
	}
	again, _ := New(testKey(1))
	rotated, _ := New(testKey(2), testKey(1))
	var none *Keyring
	if a.Fingerprint() != again.Fingerprint() || a.Fingerprint() == rotated.Fingerprint() || none.Fingerprint() != "" {
		t.Fatal("Fingerprint: want equal for the same keys, different for others, empty for none")
	}
	if strings.Contains(a.Fingerprint(), hex.EncodeToString(testKey(1))[:8]) {
		t.Fatal("Fingerprint shows the key")
	}
}

// TestIsCurrent: a value is current when the keyring's current key sealed
// it, not when an old key did, nor when it is in clear, cut short, or the
// keyring is nil.
func TestIsCurrent(t *testing.T) {
	old, _ := New(testKey(1))
	rotated, _ := New(testKey(2), testKey(1))
	byOld, err := old.Seal([]byte("rt"), nil)
	if err != nil {
		t.Fatal(err)
	}
	byCurrent, err := rotated.Seal([]byte("rt"), nil)
	if err != nil {
		t.Fatal(err)
	}
	var none *Keyring
	tests := []struct {
		name  string
		kr    *Keyring
		value []byte
		want  bool
	}{
		{"sealed with the current key", rotated, byCurrent, true},
		{"sealed with an old key", rotated, byOld, false},
		{"in clear", rotated, []byte("rt-in-clear"), false},
		{"cut short", rotated, byCurrent[:3], false},
		{"empty", rotated, nil, false},
		{"nil keyring", none, byCurrent, false},
	}
	for _, tt := range tests {
		if got := tt.kr.IsCurrent(tt.value); got != tt.want {
			t.Errorf("%s: IsCurrent = %v; want %v", tt.name, got, tt.want)
		}
	}
}
