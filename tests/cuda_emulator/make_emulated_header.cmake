# Rewrites kernel launches `kernel<T><<<grid, block, smem, stream>>>(args)` of a .cuh into
# EMU_LAUNCH(kernel<T>, args) so emulator.h can run them on the host.
file(READ "${IN}" text)
string(REGEX REPLACE "([A-Za-z_]+<[A-Za-z_]+>)<<<[^>]*>>>\\(" "EMU_LAUNCH(\\1, " text "${text}")
file(WRITE "${OUT}" "${text}")
