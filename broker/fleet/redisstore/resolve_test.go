package redisstore

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// TestResolve: every secret goes through resolve; the first failure
// names its field; the input is left as it was.
func TestResolve(t *testing.T) {
	in := Settings{Username: "u", Password: "p", EncryptionKey: "k", EncryptionKeysOld: []string{"o1", "o2"}, KeyPrefix: "x"}
	tests := []struct {
		name    string
		fail    string
		want    Settings
		wantErr string
	}{
		{name: "all", want: Settings{Username: "U", Password: "P", EncryptionKey: "K", EncryptionKeysOld: []string{"O1", "O2"}, KeyPrefix: "x"}},
		{name: "password fails", fail: "p", wantErr: "password: bad"},
		{name: "second old key fails", fail: "o2", wantErr: "encryption_keys_old[1]: bad"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := in.Resolve(func(v string) (string, error) {
				if v == tt.fail {
					return "", errors.New("bad")
				}
				return strings.ToUpper(v), nil
			})
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got.Username != tt.want.Username || got.Password != tt.want.Password || got.EncryptionKey != tt.want.EncryptionKey ||
				!slices.Equal(got.EncryptionKeysOld, tt.want.EncryptionKeysOld) || got.KeyPrefix != tt.want.KeyPrefix {
				t.Fatalf("Resolve = %+v, %v", got, err)
			}
		})
	}
	if in.EncryptionKeysOld[0] != "o1" {
		t.Fatal("Resolve changed its input")
	}
}
