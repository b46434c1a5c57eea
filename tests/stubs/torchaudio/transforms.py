class MelSpectrogram:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchaudio is a test stub here")
