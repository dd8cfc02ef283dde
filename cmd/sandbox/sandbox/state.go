package sandbox

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// stateVersion is the format of the state file; another version is refused.
const stateVersion = 1

// stateFile is the JSON document PersistState reads and writes: the bank's
// unused refresh tokens, which a merchant's consent created and which the
// broker keeps in its own storage.
type stateFile struct {
	Version       int          `json:"version"`
	RefreshTokens []savedGrant `json:"refresh_tokens"`
}

// savedGrant is one refresh token of the bank with its grant.
type savedGrant struct {
	Token  string   `json:"token"`
	Client string   `json:"client"`
	Family string   `json:"family"`
	Scopes []string `json:"scopes,omitempty"`
}

// PersistState loads the bank's refresh tokens from the JSON file at path,
// when it exists, and from then on writes them there whenever they change
// (issued, rotated, revoked): a sandbox restarted with the same path still
// accepts the refresh tokens it issued before. The file is written to a
// temporary file in the same folder and renamed over the old one, with mode
// 0600: it holds the sandbox bank's refresh tokens in clear, as a bank's
// database would. Access tokens, authorization codes and the signing key are
// not kept: a restarted sandbox issues new ones. Call it before serving.
func (s *Server) PersistState(path string) error {
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		b = nil
	case err != nil:
		return fmt.Errorf("sandbox state: %w", err)
	}
	grants := map[string]*refreshGrant{}
	if b != nil {
		var st stateFile
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&st); err != nil {
			return fmt.Errorf("sandbox state %s: %v (delete the file to start afresh)", path, err)
		}
		if st.Version != stateVersion {
			return fmt.Errorf("sandbox state %s: version %d, want %d (delete the file to start afresh)", path, st.Version, stateVersion)
		}
		for i, g := range st.RefreshTokens {
			if g.Token == "" || g.Client == "" {
				return fmt.Errorf("sandbox state %s: refresh_tokens[%d] has no token or no client (delete the file to start afresh)", path, i)
			}
			grants[g.Token] = &refreshGrant{client: g.Client, family: g.Family, scopes: g.Scopes}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for tok, g := range grants {
		s.refresh[tok] = g
	}
	s.statePath = path
	return s.writeStateLocked()
}

// saveStateLocked writes the state file after a change of the refresh
// tokens, when PersistState enabled it; a failure is logged, and the next
// change tries again. s.mu is held, so writes happen in the order of the
// changes.
func (s *Server) saveStateLocked() {
	if s.statePath == "" {
		return
	}
	if err := s.writeStateLocked(); err != nil {
		log.Printf("sandbox: %v", err)
	}
}

func (s *Server) writeStateLocked() error {
	st := stateFile{Version: stateVersion, RefreshTokens: make([]savedGrant, 0, len(s.refresh))}
	for tok, g := range s.refresh {
		st.RefreshTokens = append(st.RefreshTokens, savedGrant{Token: tok, Client: g.client, Family: g.family, Scopes: g.scopes})
	}
	slices.SortFunc(st.RefreshTokens, func(a, b savedGrant) int { return strings.Compare(a.Token, b.Token) })
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("sandbox state: %w", err)
	}
	if err := writeFileAtomic(s.statePath, append(b, '\n')); err != nil {
		return fmt.Errorf("sandbox state: %w", err)
	}
	return nil
}

// writeFileAtomic writes b to a new file beside path (mode 0600), syncs it
// and renames it over path, so a reader or a crash never sees half a file.
func writeFileAtomic(path string, b []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}
