// liblz4's block API (Debian liblz4-dev), for Storage.BlobCompression.
#include <lz4.h>
